"""Input pipeline: tokenizers, the two tfds corpora, and packed grain streams for training and eval.

  tokenizers  UTF-8 bytes or a SentencePiece model; a document's token ids, BOS first
  sources     the corpora as tfds builders (pystdlib, textdir): split by name, prepare, load a split
  pipeline    packed windows, one stream per global batch row, its checkpointed position; eval
              batches, whole documents, and the global jax batch

Paths (data.text_dir, data.tfds_dir, data.tokenizer) may be gs:// URLs.
"""
from nopejax.data import pipeline, sources, tokenizers
from nopejax.data.pipeline import TrainBatches, documents, eval_iterator, global_batch, train_iterator
from nopejax.data.sources import DATASETS, SPLITS, load_split, prepare
from nopejax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, encode_document, make_tokenizer
