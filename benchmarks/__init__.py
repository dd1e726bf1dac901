"""The stagepool benchmark harness: stagepool and its peers side by side on the same workloads.

Run ``python -m benchmarks --help``. See README.md in this folder for the method and the workloads.
Only the public ``stagepool`` API is used. pytest never collects this package (testpaths = tests).
"""
