"""Length generalization of a trained run: perplexity by length, loss by position, attention
entropy, passkey retrieval, RULER's synthetic tasks; results.json, PNG plots and report.md (protocol
and schema: docs/evaluation.md).

  python -m nopejax.evaluate --workdir runs/tiny                                  # -> runs/tiny/eval/
  python -m nopejax.evaluate --workdir runs/tiny --config.model.temperature=1.5   # -> runs/tiny/eval_c1.5/
  python -m nopejax.evaluate --workdir runs/tiny --config.model.rope_scaling=yarn \
      --config.model.rope_scaling_factor=0                                        # -> runs/tiny/eval_rope_scaling=yarn_.../
  python -m nopejax.evaluate --workdir runs/tiny --config.eval.lengths='(64,256)' --config.data.dataset=textdir \
      --config.data.text_dir=/data/pg19
  python -m nopejax.evaluate --compare runs/tiny runs/tiny/eval_c1.5 runs/tiny_search --out runs/compare

One module per measurement, each computing from a model (or a scoring callable) and plain arrays,
so a notebook can call them:
  perplexity  sliding-window perplexity by length
  entropy     loss by token position and attention entropy by query position
  passkey     passkey retrieval with greedy cached decoding
  ruler       RULER's niah_multikey, niah_multivalue, variable_tracking, common_words, generated offline
  report      the plots, report.md, and the comparison of evaluated runs
  workdir     `evaluate(workdir, overrides)`: all of them on a workdir's latest checkpoint
and `__main__` the command line on top. Every window is one document's tokens and attention runs a
query chunk at a time (model.forward_chunked), so memory grows linearly with the evaluated length.
"""
from nopejax.evaluate import entropy, passkey, perplexity, report, workdir
from nopejax.evaluate.report import compare, read_results
from nopejax.evaluate.workdir import POSITION_OVERRIDES, check_overrides, default_out_dir, eval_lengths, evaluate
