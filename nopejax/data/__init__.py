"""Input pipeline: tokenizers, the corpora, and packed grain streams for training and eval.

  tokenizers  UTF-8 bytes or a SentencePiece model; a document's token ids, BOS first
  sources     the corpora as tfds builders (pystdlib, textdir): split by name, prepare, load a split
  files       shard files read in place (data.dataset='files'): globs, one document stream per raw
              shard, bad input
  shards      the prepared ArrayRecord shard format (index.json, records, tokenizer hash)
  streams     packed batches streamed from raw shards, each process its own, their positions
  pipeline    packed windows, one stream per global batch row, its checkpointed position; eval
              batches, whole documents, and the global jax batch

Paths (data.text_dir, data.tfds_dir, data.train_files, data.eval_files, data.tokenizer) may be gs:// URLs.
"""
from nopejax.data import files, pipeline, shards, sources, streams, tokenizers
from nopejax.data.pipeline import TrainBatches, documents, eval_iterator, global_batch, token_documents, train_iterator
from nopejax.data.sources import DATASETS, SPLITS, load_split, prepare
from nopejax.data.streams import FileBatches
from nopejax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, encode_document, make_tokenizer
