"""bench.tokenizer_study: which checkpoints become rows, and the report's wording (training and scoring faked)."""
import json
from pathlib import Path

from bench import tokenizer_study as study
from pipelines import demo


def test_every_epoch_or_only_the_last_becomes_a_row(tmp_path, monkeypatch):
    root = tmp_path / 'data'
    root.mkdir()
    (root / 'prepared.json').write_text(json.dumps({'counts': {'train': 60}}))
    configs = (('every', ('--preset', 'vae-demo-fmnist32'), 3, True),
               ('last', ('--preset', 'vae-demo-fmnist32', '--num_res_blocks', '2'), 2, False))
    trained = []

    def fake_train(root_, run_dir, plan, flags, epochs, seed, quick):
        trained.append((run_dir.name, flags, epochs))
        return [(e, 10.0 * e, run_dir / f'vae-ckpt-{e}.pth') for e in range(1, epochs + 1)]

    def fake_scores(reference, sets, resamples, precision):
        return {name: {'fid': 10.0 + i, 'sfid': 1.0, 'precision': 0.5, 'recall': 0.5, 'n': 4}
                for i, name in enumerate(sets)}

    monkeypatch.setattr(study, 'CONFIGS', configs)
    monkeypatch.setattr(study, 'RESULTS', tmp_path / 'results')
    monkeypatch.setattr(study, 'demo_setup', lambda args: (demo.FULL, tmp_path / 'out', root))
    monkeypatch.setattr(study, 'train_with_epoch_checkpoints', fake_train)
    monkeypatch.setattr(demo, 'reference_npz', lambda root_, out: Path('ref.npz'))
    monkeypatch.setattr(demo, 'floor_npz', lambda root_, out, n: Path('floor.npz'))
    monkeypatch.setattr(demo, 'reconstructions_npz', lambda floor, ckpt, out: out / 'rec.npz')
    monkeypatch.setattr(demo, 'score_sets', fake_scores)
    study.main(study.get_parser().parse_args([]))
    assert [t[0] for t in trained] == ['config0', 'config1'] and trained[1][1][-1] == '2'
    rows = list(json.loads((tmp_path / 'results' / 'tokenizer_study.json').read_text())['metrics'])
    assert rows == [demo.FLOOR_ROW, 'every, epoch 1', 'every, epoch 2', 'every, epoch 3', 'last, epoch 2']
    report = (tmp_path / 'results' / 'tokenizer_study.md').read_text()
    assert '| last, epoch 2 | 4 |' in report and 'reuses the finished trainings' in report
