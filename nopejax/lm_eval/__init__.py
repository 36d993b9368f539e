"""lm-evaluation-harness on nopejax models: lm-eval's tasks score a workdir's latest model.

  python -m nopejax.lm_eval --model nopejax --model_args workdir=runs/tiny --tasks lambada_openai
  python -m nopejax.lm_eval --model nopejax --model_args workdir=W,temperature=1.5,max_length=8192 \\
      --tasks my_task --include_path tasks/ --batch_size 16

`python -m nopejax.lm_eval` takes lm_eval's own arguments: it registers the model `nopejax` and
runs lm_eval's command line. A bare `lm_eval --model nopejax` cannot work, since lm-eval finds models
only in its own package. In Python, importing this package registers the model:

  import lm_eval, nopejax.lm_eval
  lm_eval.simple_evaluate(model='nopejax', model_args={'workdir': W}, tasks=['lambada_openai'])

Requests are tokenized as lm-eval's `hf` backend tokenizes them (context and continuation encoded
whole and split at the context's length, BOS first when the tokenizer has one; rolling windows of
max_length tokens after the prefix token), so a model converted from transformers
(`python -m nopejax.convert from-hf`) scores the same tokens as `--model hf` wherever the Hugging
Face tokenizer gives sentencepiece's ids. NopeJaxLM lists the model arguments. Needs the eval extra:
pip install -e '.[eval]'.
"""
import importlib.util

MISSING = "lm-eval is not installed; install the eval extra: pip install -e '.[eval]' (lm-eval==0.4.13)."

if importlib.util.find_spec('lm_eval') is not None:
  from nopejax.lm_eval.backend import NopeJaxLM, bucket_length  # Registers the model 'nopejax'.
else:
  def __getattr__(name):
    raise ModuleNotFoundError(MISSING, name='lm_eval')
