"""``kvcomm eval --plot``: each row's speed against its fidelity on the calls it served from reused KV.

x: the reuse-call TTFT speed-up (dense's mean TTFT over the calls / the row's mean TTFT over them);
y: the row's first-token agreement with dense over those calls, with its bootstrap 95% interval.
The calls are the paired ones where the eval has them (every row over the same calls, the ones
the kvcomm row served from reused KV: points comparable with each other), else each row's own
reuse calls. Dense is the point (1, 100). The Pareto frontier joins the rows no other row beats
on both axes. Rows with no reuse calls (``prefix`` serves none) are listed under the axes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.transforms import Bbox


def points(out: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per row with reuse calls: label, x (speed-up), y (agreement %), y interval; dense first.

    From the paired rows (the same calls for every row) where ``out`` has them."""
    pts = [{"label": "dense", "x": 1.0, "y": 100.0, "ci": None, "n": 0}]
    paired = (out.get("paired") or {}).get("rows")
    if paired:
        for row in paired:
            if row["policy"] != "dense" and row.get("speedup_vs_dense"):
                pts.append({"label": row["policy"], "x": row["speedup_vs_dense"], "y": row["first_token_agree_pct"],
                            "ci": row.get("first_token_agree_pct_ci"), "n": row.get("calls", 0)})
        return pts
    for row in out["rows"]:
        if row["policy"] == "dense" or not row.get("speedup_reuse_calls"):
            continue
        pts.append({"label": row["policy"], "x": row["speedup_reuse_calls"], "y": row["first_token_agree_reuse_pct"],
                    "ci": row.get("first_token_agree_reuse_pct_ci"), "n": row.get("reuse_calls", 0)})
    return pts


def pareto(pts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both x and y (ties on both kept once), by x ascending."""
    front = [p for p in pts
             if not any(q["x"] >= p["x"] and q["y"] >= p["y"] and (q["x"] > p["x"] or q["y"] > p["y"]) for q in pts)]
    seen, out = set(), []
    for p in sorted(front, key=lambda p: (p["x"], -p["y"])):
        if (p["x"], p["y"]) not in seen:
            seen.add((p["x"], p["y"]))
            out.append(p)
    return out


def plot(out: dict[str, Any], path: str | Path) -> Path:
    """Draw ``run_eval``'s result to a PNG at ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(out)
    front = pareto(pts)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    on_front = {p["label"] for p in front}
    for p in pts:
        colour = "tab:red" if p["label"] in on_front else "tab:blue"
        if p["ci"]:
            ax.errorbar([p["x"]], [p["y"]], yerr=[[p["y"] - p["ci"][0]], [p["ci"][1] - p["y"]]], fmt="none",
                        ecolor=colour, alpha=0.35, capsize=3, lw=1)
        ax.plot([p["x"]], [p["y"]], "o", color=colour, ms=7, mec="black", mew=0.6, zorder=3)
    xs, ys = [p["x"] for p in pts], [p["y"] for p in pts]
    lows = [p["ci"][0] for p in pts if p["ci"]]
    x_lim = (min(0.8, min(xs) * 0.9), max(xs) * 1.18 + 0.2)
    y_lim = (max(-2.0, min(ys + lows) - 8), 104.0)
    # the frontier as the edge of what its points dominate: from the left axis to the bottom one
    ax.step([x_lim[0], *[p["x"] for p in front], front[-1]["x"]], [front[0]["y"], *[p["y"] for p in front], y_lim[0]],
            where="pre", color="tab:red", lw=1.2, alpha=0.7, label="Pareto frontier (red: on it)")
    ax.set_xlim(*x_lim)
    ax.set_ylim(*y_lim)
    ax.set_xlabel("reuse-call TTFT speed-up vs dense (×)")
    ax.set_ylabel("first token = dense on reuse calls (%)")
    upstream = out.get("upstream", "own")
    ax.set_title(f"kvcomm eval ({out.get('workload', 'dag')}, {out['requests']} requests x {len(out['agents'])} "
                 f"agents, upstream {upstream})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    paired = bool((out.get("paired") or {}).get("rows"))
    drawn = {p["label"] for p in pts}
    none = [r["policy"] for r in out["rows"] if r["policy"] not in drawn]
    note = ("paired: every row over the same calls (those kvcomm served from reused KV); " if paired
            else "each row over its own reuse calls; ") + "bars: bootstrap 95% interval over calls"
    if none:
        note += f"; no reuse calls: {', '.join(none)}"
    fig.text(0.01, 0.01, note, fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _labels(fig, ax, pts)  # after the layout: placed in the final display coordinates
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=130, format="png")
    plt.close(fig)
    return dest


def _labels(fig: Any, ax: Any, pts: list[dict[str, Any]]) -> None:
    """Each point's label (with its reuse-call count), placed at the first of a few offsets around
    the point where it overlaps no marker, no earlier label and stays inside the axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = []
    for p in pts:  # the markers
        cx, cy = ax.transData.transform((p["x"], p["y"]))
        taken.append(Bbox.from_extents(cx - 6, cy - 6, cx + 6, cy + 6))
    offsets = [(7, 5, "left"), (7, -13, "left"), (-7, 5, "right"), (-7, -13, "right"), (0, 12, "center"),
               (0, -22, "center"), (14, 20, "left"), (-14, 20, "right"), (14, -30, "left"), (-14, -30, "right"),
               (0, 30, "center"), (0, -40, "center")]
    for p in sorted(pts, key=lambda p: (-p["y"], p["x"])):
        text = p["label"] if p["label"] == "dense" else f"{p['label']} (n={p['n']})"
        for k, (dx, dy, ha) in enumerate(offsets):
            # past the first offsets a label can sit nearer another point: a leader line says whose it is
            leader = {"arrowstyle": "-", "color": "gray", "lw": 0.6, "shrinkA": 0, "shrinkB": 4} if k >= 4 else None
            ann = ax.annotate(text, (p["x"], p["y"]), xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=ha,
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
                              arrowprops=leader)
            box = ann.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (inside and not any(box.overlaps(t) for t in taken)) or k == len(offsets) - 1:
                taken.append(box)
                break
            ann.remove()


__all__ = ["pareto", "plot", "points"]
