def test_create_task_xclr_returns_clip_task_with_xclr_loss():
    from open_clip.loss import XCLRClipLoss
    model = open_clip.create_model('RN50')
    args = _make_args(model='RN50', xclr=True, xclr_target_temperature=0.2, xclr_chunk_size=0)
    task = create_task(args, model=model)
    assert type(task) is CLIPTask
    assert isinstance(task.loss, XCLRClipLoss)
    assert task.loss.target_temperature == 0.2
    assert task.loss.target_mode == "clip-text"
    assert task.loss.chunk_size is None


def test_create_task_xclr_chunk_size():
    from open_clip.loss import XCLRClipLoss
    model = open_clip.create_model('RN50')
    args = _make_args(model='RN50', xclr=True, xclr_target_temperature=0.1, xclr_chunk_size=8)
    task = create_task(args, model=model)
    assert isinstance(task.loss, XCLRClipLoss)
    assert task.loss.chunk_size == 8
