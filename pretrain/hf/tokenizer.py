"""Convert a sentencepiece ``.model`` into a Hugging Face fast tokenizer that encodes the *same ids*.

We build the ``tokenizers`` pipeline from the sentencepiece proto ourselves, not with transformers'
converters: those split on whitespace with a ``Metaspace`` pre-tokenizer, so a line starting with spaces
(``"   The"``) becomes ``['▁▁', '▁The']`` where sentencepiece gives ``['▁▁▁▁', 'The']``. Sentencepiece runs
its model over the whole normalised string, so we do too (no pre-tokenizer) and rebuild its normaliser:

1. ``precompiled_charsmap`` (e.g. ``nmt_nfkc``) -> ``normalizers.Precompiled`` (the same table);
2. ``remove_extra_whitespaces`` -> strip leading/trailing spaces and collapse runs of spaces;
3. ``add_dummy_prefix`` -> prepend one space; 4. ``escape_whitespaces`` -> spaces become ``▁``.

BPE merges are derived from the piece scores (sentencepiece merges the adjacent pair whose result scores
highest); unigram models keep their scores. Parity is tested on real text in ``tests/test_hf_export.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

SPACE = "\u2581"  # sentencepiece's visible space "▁"

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
UNIGRAM, BPE = 1, 2


class TokenizerExportError(ValueError):
    """The sentencepiece model uses a setting the HF pipeline cannot reproduce exactly (message names it)."""


def load_sp_proto(path: str | os.PathLike):
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError
        raise TokenizerExportError(f"{path}: not a sentencepiece model ({e})") from e
    if not proto.pieces:
        raise TokenizerExportError(f"{path}: sentencepiece model has no pieces")
    return proto


def _normalizer(proto, path) -> normalizers.Normalizer | None:
    spec = proto.normalizer_spec
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise TokenizerExportError(f"{path}: trainer_spec.treat_whitespace_as_suffix=true is not supported")
    if spec.name not in ("identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "user_defined", ""):
        raise TokenizerExportError(f"{path}: normalizer_spec.name={spec.name!r} is not supported")
    if not spec.escape_whitespaces:
        raise TokenizerExportError(f"{path}: normalizer_spec.escape_whitespaces=false is not supported")
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, ordered like sentencepiece applies them."""
    mergeable = {p.piece: (i, p.score) for i, p in enumerate(pieces) if p.type in (NORMAL, USER_DEFINED)}
    merges = []
    for piece, (pid, score) in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-score, pid, mergeable[left][0], mergeable[right][0], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def sp_to_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` giving the same ids as ``SentencePieceProcessor(model_file=path).encode``."""
    proto = load_sp_proto(path)
    pieces = proto.pieces
    spec = proto.trainer_spec
    unk_id = spec.unk_id
    byte_fallback = bool(spec.byte_fallback)
    if spec.model_type == BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        model = models.BPE(vocab, _bpe_merges(pieces), unk_token=pieces[unk_id].piece, fuse_unk=True,
                           byte_fallback=byte_fallback)
    elif spec.model_type == UNIGRAM:
        # Pieces sentencepiece never emits from text get a score that Viterbi never prefers.
        vocab = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED) else -1e9) for p in pieces]
        model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        raise TokenizerExportError(f"{path}: trainer_spec.model_type={spec.model_type} (only BPE and unigram)")

    tok = Tokenizer(model)
    tok.normalizer = _normalizer(proto, path)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    # Control symbols (bos/eos/pad) are never produced from text by sentencepiece; registering them as special
    # tokens lets HF map them to their ids when they appear in prompts and skip them when decoding. The one known
    # divergence: HF normalises the text on each side of an added token separately, so text that *contains*
    # these strings or user-defined symbols (T5 sentinels) gets an extra dummy-prefix "▁" after each of them.
    specials = [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type == CONTROL]
    specials += [AddedToken(pieces[unk_id].piece, special=True, normalized=False)]
    tok.add_special_tokens(specials)
    user = [AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


def _piece(proto, idx: int) -> str | None:
    return proto.pieces[idx].piece if 0 <= idx < len(proto.pieces) else None


def special_tokens(path: str | os.PathLike) -> dict[str, str]:
    """bos/eos/unk/pad token strings of the sentencepiece model (absent ones omitted)."""
    proto = load_sp_proto(path)
    spec = proto.trainer_spec
    ids = {"bos_token": spec.bos_id, "eos_token": spec.eos_id, "unk_token": spec.unk_id, "pad_token": spec.pad_id}
    return {k: _piece(proto, v) for k, v in ids.items() if _piece(proto, v) is not None}


def save_hf_tokenizer(sp_model: str | os.PathLike, out_dir: str | os.PathLike,
                      model_max_length: int | None = None) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (and a copy of the ``.model``) into ``out_dir``.

    ``AutoTokenizer.from_pretrained(out_dir)`` loads them as a plain fast tokenizer that adds no BOS/EOS,
    exactly like ``SentencePieceProcessor.encode``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = sp_to_tokenizer(sp_model)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **special_tokens(sp_model),
    }
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(sp_model, out / "tokenizer.model")
