"""The leaderboard's HTML page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven
by Selenium opens the file with nothing else: no script, no stylesheet, no image, no request beyond the page;
the tables and the three kinds of charts (per-task bars, average PSNR against parameters, measured minus paper)
are drawn, with the numbers of the folders and the changed test sets marked.

Without the browser packages it skips, saying how to install them; with VLUNET_REQUIRE_BROWSER=1 (set by .ci/run)
it fails instead. VLUNET_LEADERBOARD_SCREENSHOT=PATH also writes the screenshot there (docs/leaderboard.png was
made so). The result folders here are made up for the test: their numbers are the papers' plus chosen offsets,
not measurements, and the page's title says so.
"""
import os
import tempfile

import cv2
import numpy as np
import pytest

from lb_helpers import NHR_SETS, changed_copy, image_sets, install_canonical, nhr_fingerprints, result_folder
from vlunet import leaderboard
from vlunet.archs.card import get_card

CHROMIUM = os.environ.get('CHROMIUM', '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('CHROMEDRIVER', '/usr/bin/chromedriver')
INSTALL = 'apt-get update && apt-get install -y chromium chromium-driver; pip install -e ".[test]" (selenium)'
TITLE = ('Example leaderboard (NHR) of made-up result folders (tests/leaderboard/test_leaderboard_browser.py): '
         'the released and retrained columns are not measurements')
# method, network_g, origin, offset from the paper per set, params, the set measured on other files
EXAMPLE = [('PromptIR', {'type': 'PromptIR', 'decoder': True}, 'released', -0.02, 35_592_263, None),
           ('PromptIR', {'type': 'PromptIR', 'decoder': True}, 'retrained', -0.21, 35_592_263, 'changed'),
           ('AdaIR', {'type': 'AdaIR', 'decoder': True}, 'released', 0.03, 28_784_824, None),
           ('MoCE-IR-S', None, 'released', -0.08, 11_477_752, None),
           ('Restormer', {'type': 'Restormer'}, 'retrained', 0.35, 26_126_644, None),
           ('BaryIR', {'type': 'BaryIR', 'decoder': True}, 'released', -0.12, 53_765_070, 'missing')]


def _need_browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append('the selenium package')
    if missing:
        message = f'the browser test needs {", ".join(missing)}; install with: {INSTALL}'
        if os.environ.get('VLUNET_REQUIRE_BROWSER') == '1':
            pytest.fail(message)
        pytest.skip(message)


def _browser(profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage',
                f'--user-data-dir={profile}', '--window-size=1400,1000'):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _example(tmp_path, monkeypatch):
    sets = image_sets(str(tmp_path / 'sets'))
    install_canonical(monkeypatch, sets)
    fps = {None: nhr_fingerprints(sets),
           'changed': nhr_fingerprints(sets, {'Rain100L': changed_copy(str(tmp_path / 'c'), sets, 'Rain100L',
                                                                       change='002.png')}),
           'missing': nhr_fingerprints(sets, {'Rain100L': changed_copy(str(tmp_path / 'm'), sets, 'Rain100L',
                                                                       drop='003.png')})}
    folders, expected = [], {}
    for method, network, origin, offset, params, differs in EXAMPLE:
        card = get_card(method)
        variant = card.variant(method)
        paper = card.results_for('NHR', variant.name)[0].tasks
        values = {s: (round(paper[s][0] + offset, 2), round(paper[s][1] + offset / 100, 4)) for s in NHR_SETS}
        name = f'{variant.options}_NHR' + ('_released' if origin == 'released' else '')
        folders.append(result_folder(str(tmp_path), name, network or card.network_opt(variant.name), values,
                                     fps[differs], origin, params=params))
        expected[(variant.name, origin)] = (values, differs)
    return folders, expected


def test_the_page_renders_offline_with_its_charts(tmp_path, monkeypatch):
    _need_browser()
    folders, expected = _example(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert leaderboard.main(folders + ['--out', 'lb', '--no-gmacs', '--title', TITLE]) == 0
    page = (tmp_path / 'lb' / 'leaderboard.html').read_text()
    assert '<script' not in page and '<link' not in page and '<img' not in page
    assert 'http://' not in page and 'https://' not in page   # nothing it could fetch
    from selenium.webdriver.common.by import By
    driver = _browser(tempfile.mkdtemp(dir=tmp_path))
    try:
        driver.get((tmp_path / 'lb' / 'leaderboard.html').as_uri())
        assert driver.title == TITLE
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources == []   # the page loaded nothing besides itself
        # the tables
        headers = [th.text for th in driver.find_elements(By.CSS_SELECTOR, 'table')[0].find_elements(By.TAG_NAME, 'th')]
        assert headers[:7] == ['Method', 'Params (M)', 'GMACs@256', 'Paper (printed)', 'Paper (recomputed)',
                               'Released', 'Retrained']
        # the charts are drawn (laid out with a size) and hold the folders' numbers
        charts = driver.find_elements(By.CSS_SELECTOR, 'svg.chart')
        assert len(charts) == 3 + len(NHR_SETS)   # scatter, differences, average bars, one bar chart per task
        for chart in charts:
            box = chart.rect
            assert box['width'] > 300 and box['height'] > 150
        for (variant, origin), (values, differs) in expected.items():
            for task in NHR_SETS:
                bar = driver.find_elements(By.CSS_SELECTOR, f'svg.task-bars[data-task="{task}"] rect.bar'
                                                            f'[data-method="{variant}"][data-kind="{origin}"]')
                assert len(bar) == 1 and float(bar[0].get_attribute('data-value')) == pytest.approx(values[task][0])
                marked = bar[0].get_attribute('data-differs') == 'true'
                assert marked == (task == 'Rain100L' and differs is not None), (variant, origin, task)
            point = driver.find_elements(By.CSS_SELECTOR, f'#average-vs-params .point[data-method="{variant}"]'
                                                          f'[data-kind="{origin}"]')
            assert len(point) == 1
            assert float(point[0].get_attribute('data-value')) == pytest.approx(
                np.mean([v[0] for v in values.values()]), abs=1e-3)
        diffs = driver.find_elements(By.CSS_SELECTOR, '#differences rect.diff[data-task="Rain100L"]'
                                                      '[data-method="PromptIR"][data-kind="retrained"]')
        assert len(diffs) == 1 and float(diffs[0].get_attribute('data-value')) == pytest.approx(-0.21, abs=1e-6)
        assert diffs[0].get_attribute('data-differs') == 'true'
        paper_points = driver.find_elements(By.CSS_SELECTOR, '#average-vs-params .point[data-kind="paper"]')
        assert len(paper_points) >= 6
        height = driver.execute_script('return document.body.scrollHeight')
        driver.set_window_size(1400, min(height + 40, 2600))
        shot = tmp_path / 'page.png'
        driver.save_screenshot(str(shot))
        target = os.environ.get('VLUNET_LEADERBOARD_SCREENSHOT')
        if target:
            driver.save_screenshot(target)
    finally:
        driver.quit()
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[1] >= 1400 and img.std() > 20   # a drawn page, not a blank one
