"""Analysis of a search: the paper's gradient correlation (eq. 8), dL/dp per op (Figure 3), alpha
curves (Figure 4), NB201 accuracy per epoch and cell diagrams.

- `gradcorr`: per edge and op, the correlation of the weight gradients of the alpha-update batch and
  the w-update batch;
- `dldp`: dL/dp_i, the loss gradient on each op's activated weight, per edge, per cell;
- `hook`: `SearchAnalysis`, the one call the search loop makes per step (off by default);
- `curves`: run-directory logs (`alphas.jsonl`, `nb201_scores.jsonl`, `analysis.jsonl`) as arrays;
- `plots`: matplotlib figures and `render_run(run_dir)` (PNG files in `run_dir/plots/`).
"""
