def test_xclr_flags_parse():
    from open_clip_train.params import parse_args
    args = parse_args(["--xclr", "--xclr-target-temperature", "0.3", "--xclr-chunk-size", "16"])
    assert args.xclr is True
    assert args.xclr_target_temperature == 0.3
    assert args.xclr_chunk_size == 16
    default = parse_args([])
    assert default.xclr is False
    assert default.xclr_target_temperature == 0.1
    assert default.xclr_chunk_size == 0
