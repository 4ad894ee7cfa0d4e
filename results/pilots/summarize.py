"""Rebuild results/pilots/README.md's table from the pilot JSON files (run from the repo root)."""

import json
from pathlib import Path

here = Path(__file__).parent
rows = []
for f in sorted(here.glob("*.json")):
    d = json.loads(f.read_text())
    tasks = list(d["floors"])
    w = d["corpus"]["settings"]["task_weights"]
    mix = ", ".join(f"{t} {v:.0%}" for t, v in w.items() if v)
    for p in d["points"]:
        cells = [f"{p['tf'][t]:.3f} / {d['floors'][t]['floor']:.3f}" for t in tasks]
        rows.append(f"| {d['name']} | {mix} | {p['step']} | {p['val_loss']:.3f} | "
                    + " | ".join(cells) + f" | {p['eval_seconds']:.0f} |")
    greedy = ", ".join(f"{t} {a:.2f}" for t, a in d["greedy_final"].items())
    rows.append(f"| {d['name']} | greedy check at the end (100 "
                f"prompts/task): {greedy} | | | " + " | ".join("" for _ in tasks) + " | |")
header = ("| pilot | synthetic mix (60% of tokens) | step | val loss | "
          + " | ".join(f"{t} ({d['shots'][t]}-shot) acc / floor" for t in tasks)
          + " | TF eval s |")
sep = "| " + " | ".join("---" for _ in header.split("|")[1:-1]) + " |"
table = "\n".join([header, sep, *rows])
text = (here / "README.md").read_text()
start, end = text.index("<!-- table -->"), text.index("<!-- /table -->")
(here / "README.md").write_text(text[:start] + "<!-- table -->\n" + table + "\n" + text[end:])
print(table)
