from skipjack.data.tokenizer import EOD, Tokenizer, cached_bpe, train_bpe

TEXTS = [f"def function_{i}(x):\n    return x * {i} + 'naïve ☃ 𝛑'\n" for i in range(200)]


def test_training_is_deterministic():
    a, b = train_bpe(TEXTS, 400), train_bpe(TEXTS, 400)
    assert a.hf.to_str() == b.hf.to_str()


def test_round_trip_with_byte_fallback_for_unseen_characters():
    tok = train_bpe(TEXTS, 400)
    for text in (TEXTS[3], "unseen: ẞ 漢字 🙂 \x00\t end"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.eod == tok.hf.token_to_id(EOD) and tok.pad != tok.eod


def test_cache_trains_once_and_save_load_round_trips(tmp_path):
    first = cached_bpe(TEXTS, 400, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    again = cached_bpe(TEXTS, 400, tmp_path)
    assert again.path == str(files[0]) and again.hf.to_str() == first.hf.to_str()
    loaded = Tokenizer.load(files[0])
    assert loaded.encode(TEXTS[0]) == first.encode(TEXTS[0])
