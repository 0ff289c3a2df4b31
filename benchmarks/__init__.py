"""Throughput benchmarks of the fused ASPP heads against PyTorch (eager, channels_last, torch.compile).

    python -m benchmarks                  # standard cases, sized for the device at hand
    python -m benchmarks --quick --cases aspp_v3_os16 --providers eager_cl,fused_torch
    python -m benchmarks --list           # cases and providers

Modules: ``harness`` (timing, memory, MAC counting, environment), ``cases`` (what is measured and
how each provider runs it), ``run`` (the CLI: interleaved measurement, table, JSON / markdown / PNG,
``--compare``). Results: ``./bench-results/<date>_<device>.json`` (schema in docs/DESIGN.md); the committed
figures in ``benchmarks/results/`` only with ``--out benchmarks/results``.
"""
