"""Benchmarks that ship with the package (`relora-ds bench`): throughput, MFU and memory of ReLoRA against
full-rank training. throughput = arguments and the parent process, worker = one mode in one process,
report = aggregation, the table and the chart."""
