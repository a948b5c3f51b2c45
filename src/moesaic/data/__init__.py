"""Training data: the built-in corpus, text/folder/JSONL readers, BPE tokenizer training, token arrays.

    corpus.read_corpus(source)        -> Corpus (train/validation documents, split by a hash of their key)
    bpe.train_tokenizer(corpus, ...)  -> moesaic.tokenizer.Tokenizer (byte-level BPE, cached)
    tokens.tokenize_corpus(...)       -> TokenData (memory-mapped train/val token ids, cached)
    tokens.WindowSampler               deterministic, resumable order of training windows
"""

from moesaic.data.bpe import train_tokenizer
from moesaic.data.corpus import Corpus, Document, read_corpus
from moesaic.data.tokens import TokenData, WindowSampler, prepare_data, tokenize_corpus

__all__ = ["Corpus", "Document", "read_corpus", "train_tokenizer", "TokenData", "WindowSampler",
           "tokenize_corpus", "prepare_data"]
