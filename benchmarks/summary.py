"""README table from committed result files: ``python -m benchmarks.summary [FILE.json ...]``.

One row per (file, case, mode, dtype): eager_cl's median and every other provider's speedup
over it, with the device each figure was measured on. Nothing is typed in by hand.
"""
import glob
import json
import os
import sys

PROVIDERS = ["eager", "compile", "fused_torch", "fused_torch_regions", "compile_fused_torch", "fused_cpp", "fused_cpp_tiles", "fused_triton"]


def rows(path):
    records = json.load(open(path))["records"]
    groups = {}
    for r in records:
        groups.setdefault((r["case"], r["mode"], r["dtype"], r["batch"], r["device"]), {})[r["provider"]] = r
    for (case, mode, dtype, batch, device), by_provider in groups.items():
        base = by_provider.get("eager_cl")
        if base is None:
            continue
        cells = []
        for p in PROVIDERS:
            r = by_provider.get(p)
            cells.append("%.2fx" % (base["ms_median"] / r["ms_median"]) if r else "-")
        yield "| %s | %s | %s | %d | %s | %.3g | %s |" % (
            device, case, mode, batch, dtype, base["ms_median"], " | ".join(cells))


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    paths = argv or sorted(glob.glob(os.path.join(here, "results", "*.json")))
    print("| device | case | mode | batch | dtype | eager_cl ms | %s |" % " | ".join(PROVIDERS))
    print("|" + "---|" * (6 + len(PROVIDERS)))
    for path in paths:
        for row in rows(path):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
