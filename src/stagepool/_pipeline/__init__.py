"""Multi-stage pipelines: segments flow through a small DAG of named stages on one engine.

    Pipeline (_declare): stages, options, validated at declaration; cut into fused groups
      -> Flow (_flow): one batch per group on the engine's backend, linked by inboxes; the input
            is admitted only as fast as finished segments leave (a window of segments), in
            input order or longest-first with cost= (_admit)
      -> GroupRunner (_runner, in the worker): the group's stages for one segment, in order
      -> parent side (_translate): the group's answer or its failure -> one StageOutcome per stage
      -> SegmentOutcome / PipelineReport (_report); the engine's calls are in _calls / _async
      per-stage progress (bars, line, on_progress): _meter

This file stays empty on purpose: a worker unpickles ``_runner``'s classes by reference, which
imports this package, and a worker must not import the engine.
"""
