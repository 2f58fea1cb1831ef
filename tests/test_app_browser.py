"""vlunet-app in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
Selenium. Starts the app on a free loopback port with a tiny untrained VLU-Net + tiny CLIP, uploads
an image, presses "Restore" and checks the restored image, the chart, the stage grid and the
download; then a text file and an oversized image give readable messages and the next image
still comes back. Every request the page makes goes to the app itself (nothing from a CDN).

Without the browser packages it skips, saying how to install them; with VLUNET_REQUIRE_BROWSER=1
(set by .ci/run) it fails instead. VLUNET_APP_SCREENSHOT=PATH also writes the screenshot there
(docs/app.png was made so); VLUNET_APP_OPT=OPT serves that option file instead of the tiny model.
"""
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import cv2
import numpy as np
import pytest

from conftest import REPO, load_yaml
from test_cli_restore import TINY_CLIP, TINY_VLUNET, model_files
from vlunet.utils.atomic import write_atomic

CHROMIUM = os.environ.get('CHROMIUM', '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('CHROMEDRIVER', '/usr/bin/chromedriver')
INSTALL = 'apt-get update && apt-get install -y chromium chromium-driver; pip install -e ".[test]" (selenium)'


def _need_browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append('the selenium package')
    try:
        import gradio  # noqa: F401
    except ImportError:
        missing.append('the gradio package (pip install -e ".[app]")')
    if missing:
        message = f'the browser test needs {", ".join(missing)}; install with: {INSTALL}'
        if os.environ.get('VLUNET_REQUIRE_BROWSER') == '1':
            pytest.fail(message)
        pytest.skip(message)


def _start_app(opt, cwd, temp):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', TMPDIR=str(temp))
    proc = subprocess.Popen([sys.executable, '-m', 'vlunet.app', '-opt', opt, '--port', '0', '--device', 'cpu'],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if 'serving' in line and 'http://127.0.0.1:' in line:
            return proc, line.split('http://', 1)[1].split('/', 1)[0], seen
    proc.kill()
    raise AssertionError('vlunet-app did not start:\n' + ''.join(seen))


def _browser(download_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage',
                f'--user-data-dir={tempfile.mkdtemp(dir=download_dir)}', '--window-size=1400,1500'):
        options.add_argument(arg)
    options.set_capability('goog:loggingPrefs', {'performance': 'ALL'})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _noisy_photo(path, seed=0):
    """A real photo (the demo cat, 2x) at an odd size with Gaussian noise sigma 25."""
    img = cv2.imread(os.path.join(REPO, 'vlunet', 'demo_data', 'val', 'chelsea.png'))
    img = cv2.resize(img, (192, 192), interpolation=cv2.INTER_CUBIC)[:153, :191]
    noisy = img + np.random.default_rng(seed).normal(0, 25, img.shape)
    cv2.imwrite(str(path), np.clip(noisy, 0, 255).astype(np.uint8))


def _upload(driver, wait, *paths):
    from selenium.webdriver.common.by import By
    clear = driver.find_elements(By.CSS_SELECTOR, '#upload button[aria-label="Clear"]')
    if clear:
        clear[0].click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '#upload td.filename'))
    driver.find_element(By.CSS_SELECTOR, '#upload input[type=file]').send_keys('\n'.join(map(str, paths)))
    for path in paths:
        name = os.path.basename(str(path))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#upload td.filename[aria-label="{name}"]'))


def _restore(driver, wait, expect):
    """Press "Restore" and wait until the status line contains ``expect``."""
    from selenium.webdriver.common.by import By
    old = driver.find_element(By.ID, 'status').text
    driver.find_element(By.ID, 'restore').click()
    wait.until(lambda d: d.find_element(By.ID, 'status').text != old and expect in d.find_element(By.ID, 'status').text)
    return driver.find_element(By.ID, 'status').text


def _natural_size(driver, wait, selector, size):
    from selenium.webdriver.common.by import By

    def shown(d):
        imgs = d.find_elements(By.CSS_SELECTOR, selector)
        return imgs and d.execute_script('return arguments[0].complete && [arguments[0].naturalWidth, '
                                         'arguments[0].naturalHeight]', imgs[0]) == list(size)
    wait.until(shown)


def _multipart_upload(base, filename, data):
    """POST one file to Gradio's upload route as a hostile client would name it."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            f'Content-Type: image/png\r\n\r\n').encode() + data + f'\r\n--{boundary}--\r\n'.encode()
    req = urllib.request.Request(f'{base}gradio_api/upload', data=body, method='POST',
                                 headers={'Content-Type': f'multipart/form-data; boundary={boundary}'})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_app_in_headless_chromium(tmp_path):
    _need_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.monotonic()
    opt = os.environ.get('VLUNET_APP_OPT') or model_files(tmp_path, TINY_VLUNET, TINY_CLIP)
    prompts = (load_yaml(opt).get('network_clip') or {}).get('prompts') or []
    apptmp = tmp_path / 'apptmp'
    apptmp.mkdir()
    photo, notes, big, small = (tmp_path / 'noisy cat.png', tmp_path / 'notes.txt', tmp_path / 'big.png',
                                tmp_path / 'small.png')
    _noisy_photo(photo)
    notes.write_text('not an image')
    cv2.imwrite(str(big), np.zeros((2100, 2100, 3), np.uint8))  # above the default limit, 2048 x 2048
    cv2.imwrite(str(small), np.full((30, 41, 3), 128, np.uint8))
    proc, host, log = _start_app(opt, os.getcwd() if os.environ.get('VLUNET_APP_OPT') else str(tmp_path), apptmp)
    base = f'http://{host}/'
    driver = None
    try:
        started = time.monotonic() - start
        driver = _browser(tmp_path)
        wait = WebDriverWait(driver, 60)
        driver.get(base)
        wait.until(lambda d: d.find_elements(By.ID, 'restore'))
        assert driver.find_element(By.ID, 'restore').text == 'Restore'
        assert [b.text for b in driver.find_elements(By.TAG_NAME, 'button')].count('Restore') == 1

        # 1. a photo comes back at its size, with the chart, the top type, the stage grid and a download
        driver.find_element(By.CSS_SELECTOR, '#want-stages input').click()
        _upload(driver, wait, photo)
        status = _restore(driver, wait, 'Restored 1 image in')
        assert 'noisy_cat.png: 191x153, RGB, 8-bit' in status
        _natural_size(driver, wait, '#restored img', (191, 153))
        _natural_size(driver, wait, '#input-image img', (191, 153))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#report svg'))
        chart = driver.find_element(By.ID, 'report').get_attribute('innerHTML')
        for prompt in prompts:
            assert prompt in chart
        assert 'Most likely degradation:' in driver.find_element(By.ID, 'top-type').text
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#stages img'))
        assert len(driver.find_elements(By.CSS_SELECTOR, '#compare img')) == 2  # before / after slider
        link = driver.find_element(By.CSS_SELECTOR, '#download-list a')
        assert link.get_attribute('download') == 'noisy_cat_restored.png'
        with urllib.request.urlopen(link.get_attribute('href'), timeout=30) as resp:
            assert 'noisy_cat_restored.png' in resp.headers['Content-Disposition']
            restored = cv2.imdecode(np.frombuffer(resp.read(), np.uint8), cv2.IMREAD_UNCHANGED)
        assert restored.shape == (153, 191, 3) and restored.dtype == np.uint8
        driver.execute_script('window.scrollTo(0, 0)')
        png = driver.get_screenshot_as_png()
        write_atomic(str(tmp_path / 'app.png'), lambda f: f.write(png))
        if os.environ.get('VLUNET_APP_SCREENSHOT'):
            write_atomic(os.environ['VLUNET_APP_SCREENSHOT'], lambda f: f.write(png))

        # 2. a text file and an oversized image: readable messages on the page, no stack trace
        _upload(driver, wait, notes)
        status = _restore(driver, wait, 'Not restored (1)')
        assert 'notes.txt: cannot decode the image' in status and 'expected an image file' in status
        _upload(driver, wait, big)
        status = _restore(driver, wait, 'Not restored (1)')
        assert 'big.png: the image is 2100x2100 (4.4 megapixels), above the limit of 4.2 megapixels' in status
        assert 'Traceback' not in driver.find_element(By.TAG_NAME, 'body').text
        assert not driver.find_elements(By.CSS_SELECTOR, '#restored img')  # the old result is not left shown

        # 3. ... and the app keeps serving: two images at once, the second picked from the list
        _upload(driver, wait, small, photo)
        status = _restore(driver, wait, 'Restored 2 images in')
        assert 'small.png: 41x30' in status and 'noisy_cat.png: 191x153' in status
        _natural_size(driver, wait, '#restored img', (41, 30))
        assert len(driver.find_elements(By.CSS_SELECTOR, '#download-list a')) == 2
        driver.find_element(By.CSS_SELECTOR, '#picker input').click()
        wait.until(lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, 'li[role="option"]')
                              if o.text.strip() == '2. noisy_cat.png'])[0].click()
        _natural_size(driver, wait, '#restored img', (191, 153))

        # every request of the page went to the app (no CDN, no analytics)
        urls = set()
        for entry in driver.get_log('performance'):
            message = json.loads(entry['message'])['message']
            if message['method'] == 'Network.requestWillBeSent':
                urls.add(message['params']['request']['url'])
        outside = sorted(u for u in urls if not u.startswith((base, 'data:', 'blob:', 'chrome:', 'about:')))
        assert not outside, outside

        # an upload named to escape the upload folder stays inside the app's temporary folder
        stored = _multipart_upload(base, '../../escape.png', small.read_bytes())
        assert len(stored) == 1 and os.path.basename(stored[0]) == 'escape.png'
        stored = os.path.realpath(stored[0])
        assert stored.startswith(os.path.realpath(apptmp) + os.sep) and f'{os.sep}uploads{os.sep}' in stored
        seconds = time.monotonic() - start
        print(f'app started in {started:.1f} s; browser test took {seconds:.1f} s')
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, ''.join(log)
    assert os.listdir(apptmp) == []  # uploads and restored files are removed at exit
    shutil.rmtree(apptmp)
