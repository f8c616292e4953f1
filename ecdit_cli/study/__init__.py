"""Studies: a spec becomes a grid of runs, runs become tables, tables become fits and a report.

spec (YAML spec and grid, compute matching, manifest) -> collect (runs.csv, curves.csv) ->
fit (saturating power laws, bootstrap CIs, held-out checks) -> findings (the numbers a report
states; gaps: the routing gap per size over seeds; allocation: `ecdit analyze` results side by
side; claims: the paper's claims against them) -> figures (with figure_style) -> report
(report.md and report.html). archive keeps finished points' small records for a fresh clone.
"""
