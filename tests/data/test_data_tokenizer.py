"""ByteTokenizer: ids are UTF-8 bytes, decoding drops non-printable ids, loss weights as docs/design.md describes."""

import time

import numpy as np
import pytest

from sh2.data.tokenizer import EOD_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer, leading_tag_length, tag_mask


def test_constants_follow_spec():
    assert (VOCAB_SIZE, EOD_ID, PAD_ID) == (512, 0, 1)
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod_id, tok.pad_id) == (512, 0, 1)


@pytest.mark.parametrize("text", ["ACGTNacgtn", "hello, world!", "héllo ∑ 🧬 done", ""])
def test_ids_are_utf8_bytes_and_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.num_tokens(text) == len(ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_decode_drops_ids_outside_32_255():
    tok = ByteTokenizer()
    ids = [EOD_ID, ord("A"), PAD_ID, 10, ord("C"), 31, 256, 511, ord("G")]
    assert tok.decode(ids) == "ACG"
    assert tok.decode(np.array(ids)) == "ACG"


def test_uppercase_changes_ascii_letters_only_and_keeps_length():
    tok = ByteTokenizer(uppercase=True)
    text = "acgtNn|tag|ß"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == "ACGTNN|TAG|ß"


def test_lowercase_positions_get_reduced_weight():
    tok = ByteTokenizer(uppercase=True, lowercase_loss_weight=0.1)
    ids, w = tok.encode_with_weights("ACgtN")
    assert tok.decode(ids) == "ACGTN"
    np.testing.assert_array_equal(w, np.array([1, 1, 0.1, 0.1, 1], dtype=np.float32))
    # the weight depends on the original case, whether or not inputs are upper-cased
    _, w_keep_case = ByteTokenizer(lowercase_loss_weight=0.1).encode_with_weights("ACgtN")
    np.testing.assert_array_equal(w, w_keep_case)


def test_control_chars_masked():
    tok = ByteTokenizer(mask_control_chars=True)
    text = "AC\nGT\r\n\tA"
    ids, w = tok.encode_with_weights(text)
    expected = [0.0 if ord(c) < 32 else 1.0 for c in text]
    assert w.tolist() == expected
    assert tok.decode(ids) == "ACGTA"


def test_tag_spans_masked_including_delimiters():
    tok = ByteTokenizer(mask_tags=True)
    text = "|d__Bacteria|ACG|x|T"
    _, w = tok.encode_with_weights(text)
    expected = [0.0] * len("|d__Bacteria|") + [1.0] * 3 + [0.0] * 3 + [1.0]
    assert w.tolist() == expected


def test_unterminated_tag_masks_to_end():
    raw = ByteTokenizer.to_bytes("AC|open tag")
    assert tag_mask(raw).tolist() == [False, False] + [True] * 9
    assert leading_tag_length(raw) == 0
    assert leading_tag_length(ByteTokenizer.to_bytes("|ab|CG")) == 4
    assert leading_tag_length(ByteTokenizer.to_bytes("|abCG")) == 5


def test_masks_combine_and_encode_document_appends_weighted_eod():
    tok = ByteTokenizer(uppercase=True, lowercase_loss_weight=0.1, mask_control_chars=True, mask_tags=True)
    ids, w = tok.encode_document("|hdr|ac\nG")
    assert ids.tolist() == list(b"|HDR|AC\nG") + [EOD_ID]
    assert w.tolist() == pytest.approx([0, 0, 0, 0, 0, 0.1, 0.1, 0, 1, 1])
    assert ids.dtype == np.uint8 and w.dtype == np.float32


def test_negative_lowercase_weight_rejected():
    with pytest.raises(ValueError, match="lowercase_loss_weight"):
        ByteTokenizer(lowercase_loss_weight=-1.0)


def test_tokenizing_a_megabase_is_fast():
    rng = np.random.default_rng(0)
    text = rng.choice(np.frombuffer(b"ACGTacgtN", np.uint8), size=2_000_000).tobytes().decode()
    tok = ByteTokenizer(uppercase=True, lowercase_loss_weight=0.1, mask_control_chars=True, mask_tags=True)
    start = time.perf_counter()
    ids, w = tok.encode_with_weights(text)
    elapsed = time.perf_counter() - start
    assert len(ids) == len(w) == 2_000_000
    assert elapsed < 0.5, f"2 Mb took {elapsed:.3f}s; the tokenizer must stay vectorized"
