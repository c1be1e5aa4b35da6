"""bench.reproduction: the report builder on synthetic results (floor row, ± columns, targets, the curve's PNG), the
plan's checks and estimate, and the pipeline's pieces on tiny models."""
import json
from dataclasses import asdict, replace

import pytest
from PIL import Image

from bench import reproduction as bench_repro
from models import VAR_PRESETS, build_var, num_params
from pipelines import reproduction as repro
from pipelines.demo import Stages
from pipelines.reproduction import FLOOR, RECONSTRUCTION
from tests.tiny import save_tiny_checkpoints
from utils.cli import UserError

PARAMS = {'var': 2_757_540, 'viar': 1_075_980, 'supernet': 2_757_540}


def _metric(fid: float, se: float, n: int) -> dict:
    return {'fid': fid, 'fid_se': se, 'sfid': 2 * fid, 'sfid_se': 2 * se, 'precision': 0.6, 'precision_se': 0.01,
            'recall': 0.4, 'recall_se': 0.02, 'n': n, 'inception_score': None}


def synthetic_results(viar_fid, se: float = 0.5) -> dict:
    """A results dict shaped like pipelines.reproduction.run's; `viar_fid(schedule)` gives VIAR's FID."""
    plan = repro.FULL
    rows, curve = repro.model_rows(plan), repro.curve_rows(plan)
    n, nc = plan.demo.samples_per_class * 10, plan.curve_per_class * 10

    def fid(row) -> float:
        return viar_fid(row.schedule) if row.model == 'viar' else {'var': 40.0, 'supernet': 42.0}[row.model]

    metrics = {FLOOR: _metric(10.0, 0.2, n), RECONSTRUCTION: _metric(14.0, 0.3, n),
               **{r.label: _metric(fid(r), se, n) for r in rows}}
    curve_metrics = {FLOOR: _metric(12.0, 0.4, nc), RECONSTRUCTION: _metric(16.0, 0.5, nc),
                     **{r.label: _metric(fid(r) + 2, 2 * se, nc) for r in rows + curve}}
    costs = {r.label: {'params': PARAMS[r.model], 'images_per_s': 50.0 + i, 'kv_cache_MiB': 10.0,
                       'iters_per_scale': [3] * 6 if r.model == 'viar' else None, 'gflops_per_image': 0.5}
             for i, r in enumerate(rows + curve)}
    trace = {f'scale_{i}_{pn}x{pn}': [{'it': t, 'residual': 0.5 ** t, 'cosine': 1 - 0.1 ** t} for t in range(10)]
             for i, pn in enumerate((1, 2, 3, 4, 6, 8))}
    training = {m: {'seconds': 600.0, 'val_losses': [4.0, 3.5, 3.49], 'flags': f'--preset {m}'}
                for m in ('var', 'viar', 'supernet')}
    meta = {'command': 'python -m bench.reproduction', 'machine': {'cpu': 'test CPU', 'cpu_threads': 2, 'gpu': None,
                                                                   'torch': '2', 'python': '3', 'platform': 'linux'},
            'stage_seconds': {'train VAR': 700.0}, 'estimate_seconds': repro.estimate(plan), 'total_seconds': 6000.0,
            'quick': False}
    return {'plan': {**asdict(plan), 'viar_epochs': plan.viar_epochs}, 'metrics': metrics,
            'curve_metrics': curve_metrics, 'costs': costs,
            'rows': [asdict(r) for r in rows], 'curve_rows': [asdict(r) for r in curve], 'training': training,
            'trace': trace, 'reference_images': 10_000, 'tokenizer': 'tok.pth', 'meta': meta,
            'first_run_seconds': {'train VIAR': 900.0}}


def table(report: str, header: str):
    """The markdown table lines right after the first line starting with `header`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    block = []
    for line in lines[start + 1:]:
        if block and not line.startswith('|'):
            break
        if line.startswith('|'):
            block.append(line)
    return block


def test_report_has_the_floor_row_errors_targets_and_the_curve(tmp_path):
    results = synthetic_results(lambda schedule: 41.0)
    bench_repro.write_report(results, tmp_path)
    report = (tmp_path / 'reproduction.md').read_text()
    main = table(report, '## Main rows')
    assert main[0].startswith('| row | N | FID | sFID | precision | recall | FID / floor | params |')
    assert main[2].startswith(f'| {FLOOR} | 5000 | 10.00 ± 0.20 | ') and '| 1.00x |' in main[2]
    assert main[3].startswith(f'| {RECONSTRUCTION} | 5000 | 14.00 ± 0.30 |') and '| 1.40x |' in main[3]
    assert len(main) == 2 + 2 + len(repro.model_rows(repro.FULL))
    assert all(line.count(' ± ') == 4 for line in main[2:])
    assert '| 1.08M (39.0% of VAR) |' in main[5]  # the VIAR row says its share of the VAR's parameters
    # VIAR 41 vs VAR 40, each ± 0.5: ratio 1.025 ± 0.018, within 10 %.
    assert '- [x] VIAR FID within 10% of the VAR\'s: ratio 1.025 ± 0.018' in report
    assert '- [x] VIAR at most 40 % of the VAR\'s parameters: 39.0%' in report
    assert '- [x] tokenizer reconstructions FID <= 1.5x the floor' in report
    curve = table(report, '## Quality against compute')
    assert curve[2].startswith(f'| {FLOOR} | 500 | 12.00 ± 0.40 |')
    assert len(curve) == 2 + 2 + len(repro.model_rows(repro.FULL)) + len(repro.curve_rows(repro.FULL))
    assert '**Quality does not depend on the iteration count within the uncertainty**' in report
    assert f']({bench_repro.CURVE_PNG})' in report and f']({bench_repro.TRACE_PNG})' in report
    assert Image.open(tmp_path / bench_repro.CURVE_PNG).size[0] > 0
    assert '4.000 → 3.500 → 3.490' in report and 'VAR -0.010' in report
    assert "10,000 training images, 9 epochs for the VAR and 13 for VIAR (1.44x the VAR's steps;" in report
    trace = table(report, '| scale |')
    assert trace[1].startswith('| 1x1 | 1.00e+00 | 5.00e-01 | 2.50e-01 | 6.25e-02 |')  # step t = iteration t + 1
    estimate = results['meta']['estimate_seconds']
    assert f"| train VAR | {estimate['train VAR'] / 60:.1f} | 11.7 |" in report            # estimate vs measured
    # A training stage reused from an earlier run counts that run's seconds, in its row and in the total.
    assert f"| train VIAR | {estimate['train VIAR'] / 60:.1f} | 15.0 |" in report
    assert f"Command: `python -m bench.reproduction` (27 min; estimated {sum(estimate.values()) / 60:.0f} min)" \
        in report


def test_report_states_when_iterations_matter_and_a_missed_target(tmp_path):
    results = synthetic_results(lambda schedule: 80.0 if schedule == 'const:1' else 60.0)
    bench_repro.write_report(results, tmp_path)
    report = (tmp_path / 'reproduction.md').read_text()
    assert '**The iteration count changes quality measurably**' in report
    assert '82.00 (VIAR `const:1`)' in report
    assert '- [ ] VIAR FID within 10% of the VAR\'s: ratio 1.500 ± ' in report


def _args(*argv):
    return bench_repro.get_parser().parse_args(list(argv))


def test_plan_flags_and_their_checks():
    plan = bench_repro.plan_from_args(_args('--per_class', '600', '--curve_per_class', '60', '--epochs', '4'))
    assert (plan.demo.samples_per_class, plan.demo.floor_per_class, plan.curve_per_class) == (600, 600, 60)
    assert plan.demo.model_epochs == 4 and plan.demo.tokenizer_epochs == repro.FULL.demo.tokenizer_epochs
    assert plan.viar_epochs == 6 and repro.FULL.viar_epochs == 13       # 1.44x the VAR's epochs, rounded
    assert bench_repro.plan_from_args(_args()) == repro.FULL
    with pytest.raises(UserError, match='--per_class 2000: .* 1000'):
        bench_repro.plan_from_args(_args('--per_class', '2000'))
    with pytest.raises(UserError, match='--curve_per_class 200: .* --per_class 100'):
        bench_repro.plan_from_args(_args('--per_class', '100', '--curve_per_class', '200'))


def test_default_plan_fits_two_hours_and_the_docstring_says_its_estimate(capsys):
    estimate = repro.estimate(repro.FULL)
    assert sum(estimate.values()) <= 2 * 3600
    assert '\n'.join(bench_repro.estimate_lines(estimate)) in bench_repro.__doc__
    assert f'estimated {sum(estimate.values()) / 60:.0f} min' in bench_repro.__doc__
    assert repro.estimate(repro.FULL, train_tokenizer=False)['train the tokenizer'] == 0
    bench_repro.main(_args('--estimate'))
    assert capsys.readouterr().out.splitlines()[-1].split() == ['total', f'{sum(estimate.values()) / 60:.1f}', 'min']


def test_rows_of_the_plan():
    plan = repro.FULL
    rows, curve = repro.model_rows(plan), repro.curve_rows(plan)
    assert [r.model for r in rows] == ['var', 'viar', 'var', 'supernet', 'supernet']
    assert rows[1].schedule == plan.main_schedule == 'const:5' and '--eval_iters' in plan.viar_train_args()
    # Every curve schedule appears once (the main one through the main row), plus the lean KV policy.
    assert sorted(r.schedule for r in curve + rows[1:2] if r.kv_policy == 'per_iteration') == \
        sorted(plan.curve_schedules)
    assert [r.schedule for r in curve if r.kv_policy == 'lean'] == [plan.main_schedule]
    assert len({r.slug for r in rows + curve}) == len(rows + curve)
    assert rows[2].sampling_flags(plan) == ('--kv_policy', 'per_iteration', '--subnet_depth', '3', '--bridge', '3')
    assert repro.class_major_rows(4, 2) == [c * 4 + j for c in range(10) for j in range(2)]


def test_viar_preset_has_at_most_40_percent_of_the_var_parameters():
    var, viar = (num_params(build_var(VAR_PRESETS[repro.PRESETS[m]], device='meta')) for m in ('var', 'viar'))
    assert viar / var <= 0.40 and (var, viar) == (PARAMS['var'], PARAMS['viar'])


def test_cost_of_a_budget_schedule_on_a_tiny_viar(tmp_path):
    folder = save_tiny_checkpoints(tmp_path)
    row = repro.Row('VIAR budget', 'viar', 'budget:6,3')
    plan = repro.QUICK
    c = repro.cost(row, {'viar': folder / 'ar.pth'}, folder / 'vae.pth', plan, seed=0)
    assert sum(c['iters_per_scale']) <= 6 and max(c['iters_per_scale']) <= 3 and len(c['iters_per_scale']) == 4
    assert c['images_per_s'] > 0 and c['gflops_per_image'] > 0 and c['kv_cache_MiB'] > 0 and c['params'] > 0


def test_val_losses_and_a_timing_kept_across_reruns(tmp_path):
    log = tmp_path / 'log.txt'
    log.write_text('\n'.join(json.dumps(r) for r in ({'step': 1, 'train/L_mean': 5.0}, {'step': 2, 'val/L_mean': 4.5},
                                                     {'step': 4, 'val/L_mean': 4.25})) + '\n')
    assert repro.val_losses(log) == [4.5, 4.25]
    marker = tmp_path / 'wall_time.json'
    assert repro.timed_once(marker, lambda: 'first')[0] == 'first'
    marker.write_text(json.dumps({'seconds': 123.0}))
    assert repro.timed_once(marker, lambda: 'again') == ('again', 123.0)


def test_viar_trains_its_own_epochs_and_the_var_its_plans(tmp_path, monkeypatch):
    epochs = {}

    def fake_stage(root, model_dir, vae_ckpt, plan, seed, quick, preset, extra_args, token_cache):
        model_dir.mkdir(parents=True)
        (model_dir / 'log.txt').write_text('{"val/L_mean": 3.0}\n')
        epochs[model_dir.name] = plan.model_epochs
        return model_dir / 'ar-ckpt-last.pth'

    monkeypatch.setattr(repro.demo, 'train_model_stage', fake_stage)
    plan = replace(repro.FULL, viar_step_ratio=1.5)
    trained = repro.train_models(tmp_path, tmp_path, tmp_path / 'vae.pth', plan, 0, False, Stages(total=3))
    assert epochs == {'var': 9, 'viar': 14, 'supernet': 9}   # the supernet's own --ep comes with its flags
    assert trained['viar']['val_losses'] == [3.0]
