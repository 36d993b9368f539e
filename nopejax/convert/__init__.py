"""Hugging Face Llama checkpoints <-> nopejax workdirs.

  python -m nopejax.convert from-hf --hf_dir DIR --workdir OUT [--nope] [--tokenizer PATH] [--compute_dtype bfloat16]
  python -m nopejax.convert to-hf --workdir W --hf_dir OUT [--dtype bfloat16] [--fold_temperatures] [--max_shard_mb 4096]

from-hf makes a new workdir of a Hugging Face Llama directory: its config.json, and its weights as
a weights-only checkpoint that `nopejax.load`, evaluation, a search (`search.base=OUT`) and
continued pretraining read. Head-scale models' `scale_param` become the temperatures. to-hf writes
the latest model of a workdir (pretrain or search) as a Llama that transformers loads, temperatures
as scale_param or folded into q_proj. See the README for loading a NoPE model in transformers.

  layout    the tensor names and layouts of the two sides, and the two configs
  files     the safetensors files of a Hugging Face directory (one, or shards with an index)
  hf        from_hf and to_hf_dir
and `__main__` the command line on top.
"""
from nopejax.convert.safetensors_files import SafetensorsFile, checkpoint_files, write_safetensors
from nopejax.convert.hf import DTYPES, SOURCE_FILE, conversion_mesh, from_hf, read_hf_state, to_hf_dir
from nopejax.convert.layout import config_from_hf, hf_config_of, hf_layout
