"""Quality tables with a floor row and uncertainties, shared by the demo and the reproduction benchmark.

Each row is the evaluator's result dict (with the bootstrap standard errors of `evaluate(..., resamples=N)`). The
first row should be the floor: real images against the same reference set at the same N, through the same pipeline,
so that every other FID reads as a multiple of the best any model could score at that N.
"""
from typing import Dict, List, Optional, Sequence

METRICS = (('fid', 'FID', 2), ('sfid', 'sFID', 2), ('precision', 'precision', 3), ('recall', 'recall', 3))


def with_error(result: Dict[str, float], key: str, digits: int) -> str:
    """'12.34 ± 0.56' (or just the value when the row has no standard error)."""
    se = result.get(key + '_se')
    value = f'{result[key]:.{digits}f}'
    return value if se is None else f'{value} ± {se:.{digits}f}'


def quality_table(rows: Dict[str, Dict[str, float]], floor: str, extra: Optional[Dict[str, Dict[str, str]]] = None,
                  extra_columns: Sequence[str] = ()) -> List[str]:
    """Markdown lines: one row per result with 'value ± standard error' cells and FID as a multiple of the floor row's.

    `extra[row][column]` fills `extra_columns` (e.g. images/s); missing cells print '-'.
    """
    if floor not in rows:
        raise ValueError(f'the floor row {floor!r} is missing from the table')
    floor_fid = rows[floor]['fid']
    head = ['row', 'N', *[label for _, label, _ in METRICS], 'FID / floor', *extra_columns]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, result in rows.items():
        cells = [name, str(result.get('n', '-'))] + [with_error(result, key, digits) for key, _, digits in METRICS]
        cells.append(f'{result["fid"] / floor_fid:.2f}x' if floor_fid > 0 else '-')
        cells += [(extra or {}).get(name, {}).get(col, '-') for col in extra_columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def target_lines(checks: Sequence[tuple]) -> List[str]:
    """'- [x] what: measured (target)' per (what, measured text, met) check."""
    return [f'- [{"x" if met else " "}] {what}: {measured}' for what, measured, met in checks]
