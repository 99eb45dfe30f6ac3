"""The tiny T5 tokenizer and encoder the offline models share (``tiny_models.py``, ``tiny_wan.py``)."""

from __future__ import annotations


def tiny_t5_tokenizer(max_length: int):
    """A T5 (unigram) tokenizer built in memory: every printable ASCII character, alone and word-initial.

    transformers 5 takes the vocabulary as (piece, score) pairs, so no sentencepiece model file is needed.
    """
    import string

    from transformers import T5Tokenizer

    chars = sorted(set(string.printable) - set(string.whitespace))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def tiny_t5(d_model: int, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tiny_t5_tokenizer(8)),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)
