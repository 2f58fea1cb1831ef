"""``vlunet-compare RESULT_DIR... [--out DIR] [--images NAME...]``: the paper-style comparison table.

Each RESULT_DIR is a ``results/<name>/`` folder written by ``vlunet-test`` (``metrics.json`` and
``model.json``). Prints one Markdown table (method, parameters, GMACs at 256x256, PSNR/SSIM per
validation set, average over sets; first row = the degraded inputs), writes it to
``OUT/comparison.md`` and ``OUT/comparison.csv``, and with ``--images`` draws one PNG grid per image
name: input | each method | ground truth, one row per validation set holding that image.

Averages are only ever taken over the same sets: a folder that lacks a validation set another
folder has is marked ``incomplete: missing SET`` and gets no average, and so does one whose
``metrics.json`` holds a NaN/inf or lacks a metric the others have (the cell shows it, a warning
names the file, set and key).

A folder measured on a test set that differs from the canonical one, or from the files the other
folders measured, is marked ``‡`` with the set and the files that differ (from the fingerprints
``vlunet-test`` records, :mod:`vlunet.metrics.fingerprint`); it is still averaged. The environment
(package versions, device, precision, tiling) is printed under the table where it differs.
"""
import argparse
import csv
import json
import math
import os
import sys

import numpy as np

from vlunet.utils.atomic import write_atomic, write_image_atomic, write_text_atomic

GMAC_SIZE = 256


class ResultError(ValueError):
    """A results folder whose files cannot be read (the message names the file)."""


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ResultError(f'{path}: cannot be read as JSON ({err})') from None


def load_result(result_dir):
    """``{'name', 'metrics': {set: {...}}, 'model': {...}}`` of one results folder."""
    metrics_path = os.path.join(result_dir, 'metrics.json')
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f'{result_dir}: no metrics.json (expected a results/<name>/ folder of vlunet-test)')
    model_path = os.path.join(result_dir, 'model.json')
    model = _load_json(model_path) if os.path.isfile(model_path) else {}
    metrics = _load_json(metrics_path)
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        raise ResultError(f'{metrics_path}: expected {{validation set: {{psnr, ssim, ...}}}}, got '
                          f'{type(metrics).__name__}')
    return {'name': os.path.basename(os.path.normpath(result_dir)), 'dir': result_dir, 'metrics': metrics,
            'model': model if isinstance(model, dict) else {}}


class ProtocolMismatch(ValueError):
    """Two result folders were measured under different protocols (the message says how)."""


def _canonical(value):
    return json.dumps(value, sort_keys=True)


def _differences(a, b, prefix=''):
    """``['key: A vs B', ...]`` for the entries in which two protocol dicts differ."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if _canonical(a) == _canonical(b) else [f'{prefix or "protocol"}: {_short(a)} vs {_short(b)}']
    lines = []
    for key in list(a) + [k for k in b if k not in a]:
        lines += _differences(a.get(key), b.get(key), f'{prefix}.{key}' if prefix else key)
    return lines


def _short(value):
    return 'not recorded' if value is None else json.dumps(value, sort_keys=True)


def check_protocols(results):
    """Refuse to compare folders whose common validation sets were measured differently.

    A set's protocol is what ``vlunet-test`` recorded next to its numbers (metric types with their
    options, crop rule, noise/synthetic degradations and seed); folders written before protocols
    were recorded count as "not recorded", which differs from every recorded protocol.
    """
    first_seen = {}
    for r in results:
        for set_name, entry in r['metrics'].items():
            protocol = entry.get('protocol') if isinstance(entry, dict) else None
            if set_name not in first_seen:
                first_seen[set_name] = (r, protocol)
                continue
            other, other_protocol = first_seen[set_name]
            diffs = _differences(other_protocol, protocol)
            if diffs:
                raise ProtocolMismatch(
                    f'{other["dir"]} and {r["dir"]} measured {set_name} under different protocols, so their numbers '
                    'cannot stand in one table:\n' + '\n'.join(f'  {d}' for d in diffs) +
                    '\nRe-run vlunet-test for both with the same val.metrics, val.center_crop_multiple and test sets '
                    '(the shipped NHR/NHRBL test files share one protocol per setting).')
    return {name: protocol for name, (_, protocol) in first_seen.items()}


def _fmt_metric(name, opt):
    opts = ', '.join(f'{k}={v}' for k, v in opt.items() if k != 'type')
    return f'{name} = {opt.get("type")}({opts})'


def _fmt_degradations(entries):
    parts = []
    for e in entries:
        params = ', '.join(f'{k} {v}' for k, v in e.items() if k not in ('source', 'type', 'seed', 'seeding'))
        seed = f', seed {e["seed"]}' if 'seed' in e else ''
        parts.append(f'{e.get("type")} ({params}{seed})' if params else f'{e.get("type")}{seed}')
    return '; '.join(parts)


def describe_protocols(protocols):
    """Lines that say how the table's numbers were measured (printed under it)."""
    recorded = {name: p for name, p in protocols.items() if p}
    if not recorded:
        return ['Protocol: not recorded in these metrics.json files (written by an older vlunet-test).']
    lines = []
    shared = {_canonical((p.get('metrics'), p.get('crop'))) for p in recorded.values()}
    groups = [list(recorded)] if len(shared) == 1 else [[n] for n in recorded]
    for names in groups:
        p = recorded[names[0]]
        where = '' if len(groups) == 1 else f' ({names[0]})'
        metrics = '; '.join(_fmt_metric(n, o) for n, o in (p.get('metrics') or {}).items())
        lines.append(f'Protocol{where}: {metrics or "no metrics"}; crop: {p.get("crop", "none")}.')
    seeded = []
    for name, p in recorded.items():
        for key in ('noise', 'synthetic'):
            if p.get(key):
                seeded.append(f'{name}: {key} {_fmt_degradations(p[key])}')
    if seeded:
        lines.append('Degraded inputs made on the fly (identical for every method): ' + '; '.join(seeded) + '.')
    missing = [name for name, p in protocols.items() if not p]
    if missing:
        lines.append(f'Protocol not recorded for: {", ".join(missing)}.')
    return lines


def count_gmacs(network_opt, size=GMAC_SIZE):
    """Multiply-accumulates (G) of one forward at 1x3xsize x size, counted on the meta device.

    Networks whose work depends on the data (MoCE-IR's routing picks the experts) cannot run on
    the meta device; they are counted in one real CPU forward of a fixed random image instead.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import vlunet  # noqa: F401
    from basicsr.archs import build_network
    from vlunet.archs.card import card_for, example_inputs

    def count(device):
        with torch.device(device):
            net = build_network(dict(network_opt)).eval()
            g = torch.Generator(device).manual_seed(0) if device == 'cpu' else None
            args = example_inputs(card_for(net), 1, size, size, generator=g, device=device)  # what its card says it takes
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                net(*args)
        return counter.get_total_flops() / 2e9

    try:
        return count('meta')
    except (NotImplementedError, RuntimeError):  # data-dependent control flow
        torch.manual_seed(0)
        return count('cpu')


def _fmt(value, digits):
    return '-' if value is None else f'{value:.{digits}f}'


def _number(entry, key):
    """``(value, problem)`` of ``entry[key]``: a finite number, or None and what is wrong with it."""
    if key not in entry:
        return None, f'no "{key}"'
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f'"{key}" is {value!r}, not a number'
    if not math.isfinite(value):
        return None, f'"{key}" is {value}'
    return float(value), None


def _measured(metrics, sets, keys, where):
    """Cells ``{set: (psnr, ssim)}`` and the problems (missing sets, missing or non-finite values)
    of one row; ``keys``: the (psnr, ssim) key names, ``where``: the file named in problems."""
    cells, missing, invalid = {}, [], []
    for s in sets:
        entry = metrics.get(s)
        if entry is None:
            missing.append(s)
            cells[s] = (None, None)
            continue
        pair = []
        for key, expected in keys:
            value, problem = _number(entry, key)
            if problem and (expected[s] or key in entry):
                invalid.append(f'{s}: {problem} in {where}')
            pair.append(value)
        cells[s] = tuple(pair)
    return cells, missing, invalid


def build_table(results, with_gmacs=True, sets=None, test_sets=None):
    """Rows (list of dicts) and the ordered list of validation-set names.

    A row is averaged only when it has every set of the table with finite numbers; otherwise its
    ``average`` is ``(None, None)``, ``unaveraged`` lists why and ``note`` says it (``incomplete: missing
    SET``, or the invalid value with its file). ``sets``: the sets of the table, in order (default: every
    set of the folders, in the order met). ``test_sets``: :func:`check_test_sets` of the folders (default:
    computed); a row measured on a differing test set gets ``test_set`` lines (in ``note`` too) and keeps
    its average."""
    if sets is None:
        sets = []
        for r in results:
            for name in r['metrics']:
                if name not in sets:
                    sets.append(name)
    else:
        sets = list(sets)
    if test_sets is None:
        test_sets = check_test_sets(results)

    def expected(key):  # a metric is expected in a set when any folder has it there
        return {s: any(key in r['metrics'].get(s, {}) for r in results) for s in sets}

    method_keys = [('psnr', expected('psnr')), ('ssim', expected('ssim'))]
    input_keys = [('input_psnr', expected('input_psnr')), ('input_ssim', expected('input_ssim'))]
    rows = []
    # the degraded inputs: each set from the first folder that has it (the inputs are the same for all)
    first = {s: next(r['metrics'][s] for r in results if s in r['metrics']) for s in sets
             if any(s in r['metrics'] for r in results)}
    cells, missing, invalid = _measured(first, sets, input_keys, 'the first metrics.json holding the set')
    rows.append({'method': 'Input (degraded)', 'params_M': None, 'gmacs': None, **cells,
                 'missing': missing, 'invalid': invalid, 'test_set': [], 'dir': None})
    for r in results:
        model = r['model']
        gmacs = model.get('gmacs_256')
        if gmacs is None and with_gmacs and model.get('network_g'):
            try:
                gmacs = count_gmacs(model['network_g'])
            except Exception as err:  # an arch that cannot run on the meta device: leave the cell empty
                print(f'warning: GMACs of {r["name"]} not counted ({err})', file=sys.stderr)
        params = model.get('params')
        label = r['name'] + (f' ({model["network_g"]["type"]})' if model.get('network_g') else '')
        if (model.get('conditioning') or '').startswith('text prompt'):  # DFPIR: oracle or blind prompt
            label = label[:-1] + f', {model["conditioning"]})'
        cells, missing, invalid = _measured(r['metrics'], sets, method_keys,
                                            os.path.join(r['dir'], 'metrics.json'))
        differing = [f'{s}: {"; ".join(test_sets[(r["dir"], s)]["lines"])}' for s in sets
                     if test_sets.get((r['dir'], s), {}).get('status') == 'differs']
        rows.append({'method': label, 'params_M': None if params is None else params / 1e6, 'gmacs': gmacs,
                     **cells, 'missing': missing, 'invalid': invalid, 'test_set': differing, 'dir': r['dir']})
    for row in rows:
        notes = []
        if row['missing']:
            notes.append(f'incomplete: missing {", ".join(row["missing"])}')
        notes += [f'invalid: {p}' for p in row['invalid']]
        row['unaveraged'] = notes
        row['note'] = '; '.join(notes + [f'test set differs: {line}' for line in row['test_set']])
        if notes or not sets:
            row['average'] = (None, None)
            continue
        psnrs, ssims = [row[s][0] for s in sets], [row[s][1] for s in sets]
        # a metric no folder recorded (e.g. the inputs' when no set has them) has no average either
        row['average'] = (float(np.mean(psnrs)) if all(p is not None for p in psnrs) else None,
                          float(np.mean(ssims)) if all(q is not None for q in ssims) else None)
    return rows, sets


# ------------------------------------------------------------------------------------------------
# test sets and environments
# ------------------------------------------------------------------------------------------------
def check_test_sets(results):
    """``{(folder, set): {'status': 'matches' | 'differs' | 'unknown', 'lines': [...], 'check': ...}}``.

    Each recorded fingerprint is checked against the canonical set (:func:`vlunet.metrics.fingerprint.
    check_fingerprint`, with the package's current knowledge) and against the other folders: where
    folders measured a set on different files and none of them on the canonical content, those that
    differ from the files most folders measured are marked, naming the files (all of them when no
    majority exists), so that one changed file stands out also among copies that all differ from the
    canonical set."""
    from vlunet.metrics.fingerprint import canonical_for, check_fingerprint, fingerprint_differences
    found = {}
    by_set = {}
    for r in results:
        for set_name, entry in r['metrics'].items():
            fp = entry.get('fingerprint') if isinstance(entry, dict) else None
            check = check_fingerprint(set_name, fp)
            lines = list(check['differences']) if check['status'] == 'differs' else []
            found[(r['dir'], set_name)] = {'status': check['status'], 'lines': lines, 'check': check}
            if fp and fp.get('hash'):
                by_set.setdefault(set_name, []).append((r, fp))
    for set_name, measured in by_set.items():
        groups = {}
        for r, fp in measured:
            groups.setdefault(fp['hash'], []).append((r, fp))
        if len(groups) < 2:
            continue
        known = canonical_for(set_name, measured[0][1])
        if known is not None and known.hash in groups:
            continue  # some folders measured the canonical set: the others are marked against it, file by file
        sizes = sorted((len(g) for g in groups.values()), reverse=True)
        majority = next(h for h, g in groups.items() if len(g) == sizes[0]) if sizes[0] > sizes[1] else None
        for digest, group in groups.items():
            if digest == majority:
                continue
            for r, fp in group:
                if majority is not None:
                    ref_dirs = [other['dir'] for other, _ in groups[majority]]
                    ref_fp = groups[majority][0][1]
                    names = ', '.join(os.path.basename(os.path.normpath(d)) for d in ref_dirs)
                    lines = [f'measured on other files than {names}'] + fingerprint_differences(
                        fp, ref_fp.get('files') or {}, f'the files of {names}')
                else:
                    lines = ['the folders measured this set on different files (no majority): '
                             + ', '.join(f'{os.path.basename(os.path.normpath(o["dir"]))} {f["hash"][:12]}'
                                         for o, f in measured)]
                entry = found[(r['dir'], set_name)]
                entry['status'] = 'differs'
                entry['lines'] += [line for line in lines if line not in entry['lines']]
    return found


def describe_test_sets(results, sets, test_sets=None):
    """Lines under the table: per set, its fingerprint and check; every folder that differs, and how."""
    from vlunet.metrics.fingerprint import describe_fingerprint
    test_sets = check_test_sets(results) if test_sets is None else test_sets
    lines = []
    for s in sets:
        entries = [(r, test_sets[(r['dir'], s)]) for r in results if (r['dir'], s) in test_sets]
        if not entries:
            continue
        check = entries[0][1]['check']
        fps = {describe_fingerprint(r['metrics'][s].get('fingerprint')) for r, _ in entries}
        canonical = check.get('canonical')
        base = f'{s}: ' + ' | '.join(sorted(fps))
        statuses = {e['status'] for _, e in entries}
        if canonical and statuses == {'matches'}:
            base += f' = the canonical {canonical} (checked: {check["checked"]})'
        elif canonical:
            base += f'; canonical {canonical} checked by {check["checked"]}'
        else:
            base += '; no canonical set known to check against'
        lines.append(base + '.')
        groups = {}
        for r, entry in entries:
            if entry['status'] == 'differs':
                groups.setdefault(tuple(entry['lines']), []).append(r['name'])
        for differences, names in groups.items():
            lines.append(f'  ‡ {", ".join(names)}: {s} differs: ' + '; '.join(differences) + '.')
    return lines


def describe_environments(results):
    """Lines: the environment the folders share, and each folder whose metric-relevant entries differ."""
    from vlunet.metrics.environment import describe_environment, environment_differences
    envs = []
    for r in results:
        recorded = [e.get('environment') for e in r['metrics'].values() if isinstance(e, dict)]
        envs.append((r, next((e for e in recorded if e), None)))
    if not envs:
        return []
    reference = envs[0][1]
    lines = [f'Environment ({envs[0][0]["name"]}): {describe_environment(reference)}.']
    for r, env in envs[1:]:
        diffs = environment_differences(reference, env)
        if diffs:
            lines.append(f'  {r["name"]} differs: {"; ".join(diffs)}.')
    if len(lines) == 1 and len(envs) > 1:
        lines[0] = f'Environment (all folders): {describe_environment(reference)}.'
    return lines


def _cell(row, s):
    if s in row['missing']:
        return 'missing'
    return f'{_fmt(row[s][0], 2)} / {_fmt(row[s][1], 4)}'


def to_markdown(rows, sets):
    head = ['Method', 'Params (M)', f'GMACs@{GMAC_SIZE}'] + [f'{s} PSNR/SSIM' for s in sets] + ['Average']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for row in rows:
        cells = [row['method'] + (' ‡' if row.get('test_set') else ''), _fmt(row['params_M'], 2),
                 _fmt(row['gmacs'], 2)]
        cells += [_cell(row, s) for s in sets]
        average = f'{_fmt(row["average"][0], 2)} / {_fmt(row["average"][1], 4)}'
        if row.get('unaveraged'):
            average = 'not averaged (' + ('incomplete' if row['missing'] else 'invalid values') + ')'
        lines.append('| ' + ' | '.join(cells + [average]) + ' |')
    return '\n'.join(lines)


def describe_unaveraged(rows):
    """Lines under the table naming each row that got no average, and why."""
    lines = [f'Not averaged: {row["method"]}: {"; ".join(row["unaveraged"])}.' for row in rows
             if row.get('unaveraged')]
    if lines:
        lines.append('An average over other sets would not compare with the rest; re-run vlunet-test for the '
                     'missing sets, or compare only folders that share them.')
    return lines


def write_csv(path, rows, sets):
    def write(f):
        writer = csv.writer(f)
        header = ['method', 'params_M', 'gmacs_256']
        for s in sets + ['average']:
            header += [f'{s}_psnr', f'{s}_ssim']
        writer.writerow(header + ['note'])
        for row in rows:
            values = [row['method'], row['params_M'], row['gmacs']]
            for s in sets + ['average']:
                values += list(row[s])
            writer.writerow(['' if v is None else v for v in values] + [row.get('note', '')])

    write_atomic(path, write, binary=False)


def _find_image(folder, stem, suffixes):
    for suffix in suffixes:
        path = os.path.join(folder, f'{stem}_{suffix}.png')
        if os.path.isfile(path):
            return path
    return None


def image_grid(results, image_name, out_path, tile=192):
    """PNG grid for one image name: rows = validation sets, columns = input | methods | ground truth."""
    import cv2
    grid_rows = []
    for set_name in results[0]['metrics']:
        cells = []
        vis = [os.path.join(r['dir'], 'visualization', set_name) for r in results]
        lq = next((p for p in (_find_image(v, image_name, ['lq']) for v in vis) if p), None)
        gt = next((p for p in (_find_image(v, image_name, ['gt']) for v in vis) if p), None)
        outs = [_find_image(v, image_name, [r['name'], 'restored']) for v, r in zip(vis, results)]
        if lq is None or gt is None or not any(outs):
            continue
        labels = ['input'] + [r['name'] for r in results] + ['ground truth']
        for path, label in zip([lq] + outs + [gt], labels):
            img = cv2.imread(path, cv2.IMREAD_COLOR) if path else None
            if img is None:
                img = np.zeros((tile, tile, 3), np.uint8)
            h, w = img.shape[:2]
            scale = tile / max(h, w)
            img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
            canvas = np.full((tile + 22, tile, 3), 255, np.uint8)
            canvas[22:22 + img.shape[0], :img.shape[1]] = img
            cv2.putText(canvas, f'{label}'[:28], (2, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
            cells.append(canvas)
        row = np.hstack(cells)
        banner = np.full((20, row.shape[1], 3), 235, np.uint8)
        cv2.putText(banner, set_name, (2, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        grid_rows.append(np.vstack([banner, row]))
    if not grid_rows:
        raise FileNotFoundError(f'no saved images named {image_name!r} (with _lq/_gt) in the results '
                                '(run vlunet-test with val.save_img: true)')
    width = max(r.shape[1] for r in grid_rows)
    grid = np.vstack([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in grid_rows])
    write_image_atomic(out_path, grid)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(prog='vlunet-compare', description=__doc__.split('\n\n')[0])
    parser.add_argument('results', nargs='+', help='results/<name>/ folders written by vlunet-test')
    parser.add_argument('--out', default='comparison', help='folder for comparison.md/.csv and grids')
    parser.add_argument('--images', nargs='*', default=[], help='image names (file stems) to show side by side')
    parser.add_argument('--no-gmacs', action='store_true', help='do not count GMACs (faster)')
    args = parser.parse_args(argv)

    results = []
    for d in args.results:
        if not os.path.isfile(os.path.join(d, 'metrics.json')):
            print(f'warning: skipping {d}: no metrics.json', file=sys.stderr)
            continue
        try:
            results.append(load_result(d))
        except ResultError as err:
            print(f'warning: skipping {d}: {err}', file=sys.stderr)
    if not results:
        print('error: none of the given folders holds a metrics.json written by vlunet-test', file=sys.stderr)
        return 2
    try:
        protocols = check_protocols(results)
    except ProtocolMismatch as err:
        print(f'error: {err}', file=sys.stderr)
        return 3
    test_sets = check_test_sets(results)
    rows, sets = build_table(results, with_gmacs=not args.no_gmacs, test_sets=test_sets)
    table = to_markdown(rows, sets)
    unaveraged = describe_unaveraged(rows)
    for line in unaveraged[:-1]:
        print(f'warning: {line}', file=sys.stderr)
    for row in rows:
        for line in row['test_set']:
            print(f'warning: {row["method"]} measured a test set that differs: {line}', file=sys.stderr)
    notes = unaveraged + describe_protocols(protocols)
    set_lines = describe_test_sets(results, sets, test_sets)
    if set_lines:
        notes.append('Test sets (‡: measured on files that differ):\n' + '\n'.join(set_lines))
    notes += describe_environments(results)
    print(table + '\n\n' + '\n'.join(notes))
    os.makedirs(args.out, exist_ok=True)
    write_text_atomic(os.path.join(args.out, 'comparison.md'),
                      table + '\n\n' + '\n\n'.join(notes) + '\n\nPSNR in dB / SSIM; GMACs of the restoration '
                      'network alone for one 1x3x256x256 forward (the CLIP encoder is not counted).\n')
    write_csv(os.path.join(args.out, 'comparison.csv'), rows, sets)
    print(f'\nwrote {os.path.join(args.out, "comparison.md")} and comparison.csv')
    for name in args.images:
        path = image_grid(results, name, os.path.join(args.out, f'grid_{name}.png'))
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
