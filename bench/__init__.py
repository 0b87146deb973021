"""spurfast microbenchmarks: `python -m bench {encoder,kmeans,loader,e2e,all} [--quick]`.

Every benchmark appends rows to one long-format CSV (bench/results.csv by default) via
`bench.harness`; plots are made from that CSV (`python -m bench plot`).
"""
