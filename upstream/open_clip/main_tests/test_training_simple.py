@pytest.mark.skipif(sys.platform.startswith('darwin'), reason="macos pickle bug with locals")
def test_training_xclr(monkeypatch):
    import open_clip_train.main as train_main
    from open_clip.loss import ClipLoss, XCLRClipLoss
    tasks = []
    create_task = train_main.create_task

    def recording_create_task(*args, **kwargs):
        tasks.append(create_task(*args, **kwargs))
        return tasks[-1]

    monkeypatch.setattr(train_main, "create_task", recording_create_task)
    main([
    '--save-frequency', '1',
    '--dataset-type', "synthetic",
    '--train-num-samples', '16',
    '--warmup', '1',
    '--batch-size', '4',
    '--lr', '1e-3',
    '--wd', '0.1',
    '--epochs', '1',
    '--workers', '2',
    '--model', 'RN50',
    '--xclr',
    ])
    assert len(tasks) == 1
    assert isinstance(tasks[0].loss, XCLRClipLoss)
    assert type(tasks[0].loss) is not ClipLoss
