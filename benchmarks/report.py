"""The benchmark's reports: the text and markdown tables, the PNG chart of speedups over the
baseline, and ``compare`` (regressions against an earlier results file). Pure functions of the
records (docs/DESIGN.md, "Benchmarks", for their schema); ``benchmarks/run.py`` measures.
"""
from typing import List, Optional, Tuple

from benchmarks import cases as C

REGRESSION_THRESHOLD = 0.05


# --------------------------------------------------------------------------- reports


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "%.*g" % (nd, v) if abs(v) < 10 ** nd else "%.0f" % v
    return str(v)


COLUMNS = [("case", "case"), ("mode", "mode"), ("dtype", "dtype"), ("provider", "provider"),
           ("ms_median", "ms median"), ("range", "p20-p80"), ("images_per_s", "img/s"),
           ("tflops_executed", "TFLOP/s exec"), ("tflops_dense", "TFLOP/s dense"),
           ("pct_of_matmul_peak_dense", "% peak (dense)"), ("roofline_ms", "bound ms"),
           ("pct_of_roofline", "% bound"), ("peak_mem_mb", "peak MB"),
           ("speedup_vs_eager_cl", "x eager_cl")]


def table_rows(records: List[dict]) -> List[List[str]]:
    rows = []
    for r in records:
        row = []
        for key, _ in COLUMNS:
            if key == "range":
                row.append("%s-%s" % (_fmt(r["ms_p20"]), _fmt(r["ms_p80"])))
            elif key in ("tflops_executed", "tflops_dense"):
                row.append("%.3g" % r[key])
            else:
                row.append(_fmt(r.get(key)))  # (results files older than a column lack it)
        rows.append(row)
    return rows


def text_table(records: List[dict]) -> str:
    heads = [h for _, h in COLUMNS]
    rows = table_rows(records)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)),
             "  ".join("-" * w for w in widths)]
    prev = None
    for r, row in zip(records, rows):
        group = (r["case"], r["mode"], r["dtype"])
        if prev is not None and group != prev:
            lines.append("")
        prev = group
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    out = ["# aspp_fused benchmarks: %s" % meta["device"], "",
           "Measured %s with `%s` at commit `%s`; torch %s, triton %s, Python %s." % (
               meta["date"], meta["command"], meta["commit"], meta["torch"], meta["triton"], meta["python"]),
           ""]
    out += ["- %s" % n for n in meta["notes"]]
    out += ["", "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(row) + " |" for row in table_rows(doc["records"])]
    if doc["skipped"]:
        out += ["", "Skipped:", ""]
        seen = set()
        for s in doc["skipped"]:
            key = (s["provider"], s["reason"])
            cases_ = sorted({t["case"] for t in doc["skipped"] if (t["provider"], t["reason"]) == key})
            if key not in seen:
                seen.add(key)
                out.append("- `%s` (%s): %s" % (s["provider"], ", ".join(cases_), s["reason"]))
    out += ["", "Cases (per-sample input; MACs of one forward of the whole batch, conv layers only; executed = "
            "(pixel, tap) pairs whose tap lands inside the image):", "",
            "| case | what | batch | input | GMAC dense | GMAC executed | executed / dense |",
            "|---|---|---|---|---|---|---|"]
    for c in meta["cases"]:
        out.append("| %s | %s | %d | %s | %.2f | %.2f | %.1f%% |" % (
            c["case"], c["title"], c["batch"], c["input"], c["gmacs_dense"], c["gmacs_executed"],
            100 * c["gmacs_executed"] / max(c["gmacs_dense"], 1e-12)))
    if doc.get("regressions") is not None:
        out += ["", "Compared with `%s`: %d regression(s) > %.0f%%." % (
            meta.get("compared_with"), len(doc["regressions"]), 100 * meta["regression_threshold"])]
        out += ["- %s %s %s %s: %.3f ms -> %.3f ms (%+.1f%%)" % (
            g["case"], g["provider"], g["mode"], g["dtype"], g["old_ms"], g["new_ms"], 100 * (g["ratio"] - 1))
            for g in doc["regressions"]]
    return "\n".join(out) + "\n"


def chart(doc: dict, path: str) -> Optional[str]:
    """PNG of speedups over eager_cl, one panel per (mode, dtype). Returns None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the [bench] extra): no PNG chart"
    recs = [r for r in doc["records"] if r.get("speedup_vs_eager_cl") is not None]
    if not recs:
        return "no record has an eager_cl baseline to compare with: no PNG chart"
    panels = sorted({(r["mode"], r["dtype"]) for r in recs})
    providers = [p for p in C.PROVIDERS if any(r["provider"] == p for r in recs)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4 * len(panels)), squeeze=False)
    for ax, (mode, dt) in zip(axes[:, 0], panels):
        sub = [r for r in recs if (r["mode"], r["dtype"]) == (mode, dt)]
        names = [c for c in dict.fromkeys(r["case"] for r in sub)]
        width = 0.8 / len(providers)
        for k, prov in enumerate(providers):
            ys = [next((r["speedup_vs_eager_cl"] for r in sub if r["case"] == c and r["provider"] == prov), None)
                  for c in names]
            xs = [i + (k - (len(providers) - 1) / 2) * width for i in range(len(names))]
            xs, ys = [x for x, y in zip(xs, ys) if y], [y for y in ys if y]  # skipped: no bar
            bars = ax.bar(xs, ys, width, label=prov)
            for b, y in zip(bars, ys):
                ax.annotate("%.2f" % y, (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")  # speedups are ratios: 0.5x and 2x sit equally far from 1
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: "%gx" % v))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=15, fontsize=8)
        ax.set_ylabel("speedup vs eager_cl (median)")
        ax.set_title("%s, %s, %s" % (doc["meta"]["device"], mode, dt), fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def skipped_lines(skipped: List[dict]) -> List[str]:
    """One line per (provider, reason), naming the groups it covers."""
    by = {}
    for s in skipped:
        by.setdefault((s["provider"], s["reason"]), []).append("%s %s %s" % (s["case"], s["mode"], s["dtype"]))
    return ["  %-13s %s: %s" % (prov, ", ".join(groups), reason) for (prov, reason), groups in by.items()]


# --------------------------------------------------------------------------- compare


def record_key(r: dict) -> Tuple:
    return (r["case"], r["provider"], r["mode"], r["dtype"], r["batch"])


def compare(old_records: List[dict], new_records: List[dict], threshold: float = REGRESSION_THRESHOLD):
    """(rows, regressions): every matching record's old and new median; a regression is a
    record more than ``threshold`` (5%) slower than before."""
    old = {record_key(r): r for r in old_records}
    rows, regressions = [], []
    for r in new_records:
        o = old.get(record_key(r))
        if o is None:
            continue
        ratio = r["ms_median"] / o["ms_median"] if o["ms_median"] > 0 else float("inf")
        row = {"case": r["case"], "provider": r["provider"], "mode": r["mode"], "dtype": r["dtype"],
               "batch": r["batch"], "old_ms": o["ms_median"], "new_ms": r["ms_median"], "ratio": round(ratio, 4),
               "regression": ratio > 1 + threshold}
        rows.append(row)
        if row["regression"]:
            regressions.append(row)
    return rows, regressions
