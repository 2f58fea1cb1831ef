"""vlunet-app serves only what it was given (issue: the page returned any image file of the server).

Against the running app (a subprocess, as a user starts it) a hostile client forges file paths
(absolute, relative to the app's working directory, ``..``, a link inside the upload folder,
``/proc``, URLs) on every endpoint that takes one, forges the Host and Origin headers, and pushes
the upload and work limits; a normal upload still restores. In-process tests show the two layers
behind the request guard: Gradio's own upload-folder check (active although the app is mounted, not
launched) and the handler's re-check (:func:`vlunet.app.read_upload`).
"""
import glob
import http.client
import json
import os
import subprocess
import threading
import uuid

import cv2
import numpy as np
import pytest

from test_app_browser import _start_app
from test_cli_restore import DGUNET, model_files

SECRET = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)  # pixels the client must never see
REFUSED = b'Refused: the request names a file that was not uploaded to this page'


class Client:
    def __init__(self, host):
        self.host = host
        self.address, self.port = host.rsplit(':', 1)

    def request(self, method, path, body=None, headers=None, host=None):
        conn = http.client.HTTPConnection(self.address, int(self.port), timeout=60)
        sent = {'Host': self.host if host is None else host}
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            sent['Content-Type'] = 'application/json'
        sent.update(headers or {})
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def upload(self, files):
        """POST ``[(name, bytes)]`` to Gradio's upload route; returns (status, paths or body)."""
        boundary = uuid.uuid4().hex
        body = b''.join(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                        f'Content-Type: image/png\r\n\r\n'.encode() + data + b'\r\n' for name, data in files)
        body += f'--{boundary}--\r\n'.encode()
        status, _, data = self.request('POST', '/gradio_api/upload', body,
                                       {'Content-Type': f'multipart/form-data; boundary={boundary}'})
        return status, (json.loads(data) if status == 200 else data)

    def restore(self, files, tiled=False, tile=256, overlap=32):
        """Call the page's restore function through the simple API; returns its output values."""
        status, _, data = self.request('POST', '/gradio_api/call/on_restore',
                                       {'data': [files, False, tiled, tile, overlap]})
        assert status == 200, (status, data)
        status, _, events = self.request('GET', f'/gradio_api/call/on_restore/{json.loads(data)["event_id"]}')
        text = events.decode()
        assert 'event: complete' in text, text[:2000]
        return json.loads(text.split('event: complete\ndata: ', 1)[1].split('\n', 1)[0])


def file_data(path):
    return {'path': path, 'meta': {'_type': 'gradio.FileData'}}


def png(img):
    return cv2.imencode('.png', img)[1].tobytes()


@pytest.fixture(scope='module')
def launched(tmp_path_factory):
    """The app, started in the background (it starts while the in-process tests run)."""
    root = tmp_path_factory.mktemp('app_security')
    opt = model_files(root, DGUNET)
    cv2.imwrite(str(root / 'secret.png'), SECRET)          # in the app's working directory
    (root / 'secret.txt').write_text('password=hunter2\n')
    apptmp = root / 'apptmp'
    apptmp.mkdir()
    result = {}
    thread = threading.Thread(target=lambda: result.update(started=_start_app(opt, str(root), apptmp)), daemon=True)
    thread.start()
    yield thread, result, root, apptmp
    thread.join(timeout=150)
    if 'started' in result:
        proc = result['started'][0]
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope='module', autouse=True)
def _launch_early(launched):
    """Start the app before the first test of this file, whichever it is."""


@pytest.fixture(scope='module')
def app(launched):
    thread, result, root, apptmp = launched
    thread.join(timeout=150)
    assert 'started' in result, 'vlunet-app did not start (see the test output)'
    uploads = glob.glob(str(apptmp / 'vlunet-app-*' / 'uploads'))
    assert len(uploads) == 1, os.listdir(apptmp)
    return Client(result['started'][1]), root, os.path.realpath(uploads[0])


def _forged(root, uploads, host):
    """Paths of files the app was not given, as a hostile client would name them."""
    link_dir = os.path.join(uploads, 'planted')
    os.makedirs(link_dir, exist_ok=True)
    link = os.path.join(link_dir, 'photo.png')
    if not os.path.islink(link):
        os.symlink(root / 'secret.png', link)  # a link inside the upload folder that leads out of it
    return [
        str(root / 'secret.png'),                                  # absolute
        'secret.png',                                              # relative to the app's working directory
        os.path.join(uploads, '..', '..', '..', 'secret.png'),     # .. out of the upload folder
        link,                                                      # link inside the upload folder
        '/proc/self/environ', '/etc/passwd', str(root / 'secret.txt'),
        f'file://{root}/secret.png', f'http://{host}/gradio_api/file={root}/secret.png',
        '/nonexistent/folder/x.png',                                # does not exist: same answer
    ]


def _holds_secret(folder):
    """Any file under ``folder`` with the secret's bytes or pixels (a copy Gradio made)."""
    secret_png = png(SECRET)
    for path in glob.glob(os.path.join(folder, '**', '*'), recursive=True):
        if os.path.isfile(path) and not os.path.islink(path):
            data = open(path, 'rb').read()
            if data == secret_png or b'hunter2' in data:
                return path
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
            if img is not None and img.shape == SECRET.shape and np.array_equal(img, SECRET):
                return path
    return None


# ------------------------------------------------------------- the layers behind the request guard
def test_gradio_refuses_files_it_did_not_receive_although_the_app_is_mounted(tmp_path, monkeypatch):
    """Without our guard, Gradio's own check (processing_utils._check_allowed, active only after
    launch()) must refuse a forged path, so that nothing outside the upload folder is copied in."""
    pytest.importorskip('gradio')
    from starlette.testclient import TestClient

    from vlunet.app import Restorer, make_app
    from vlunet.restore import build_engine
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(tmp_path / 'uploads'))
    monkeypatch.setenv('GRADIO_ANALYTICS_ENABLED', 'False')
    cv2.imwrite(str(tmp_path / 'secret.png'), SECRET)
    restorer = Restorer(build_engine(model_files(tmp_path, DGUNET)), str(tmp_path / 'restored'))
    guard = make_app(restorer, 'test', upload_dir=str(tmp_path / 'uploads'))
    restorer.upload_dir = None  # the handler's re-check off as well: only Gradio's check is left
    with TestClient(guard.app) as client:  # guard.app: the app without the guard in front
        resp = client.post('/gradio_api/call/on_restore',
                           json={'data': [[file_data(str(tmp_path / 'secret.png'))], False, False, 256, 32]})
        events = client.get(f'/gradio_api/call/on_restore/{resp.json()["event_id"]}').text
    assert 'event: error' in events and 'event: complete' not in events
    assert 'secret' not in events  # show_error=False: no path, no reason
    assert _holds_secret(str(tmp_path / 'uploads')) is None


def test_read_upload_takes_only_regular_files_inside_the_upload_folder(tmp_path):
    from vlunet.app import REFUSED as REFUSED_TEXT
    from vlunet.app import UploadRefused, read_upload
    root = tmp_path / 'uploads'
    (root / 'abc').mkdir(parents=True)
    (root / 'abc' / 'ok.png').write_bytes(b'fine')
    (tmp_path / 'outside.png').write_bytes(b'secret')
    os.symlink(tmp_path / 'outside.png', root / 'abc' / 'link.png')
    os.symlink(root / 'abc' / 'ok.png', root / 'abc' / 'inner_link.png')  # stays inside: allowed
    os.mkfifo(root / 'abc' / 'pipe.png')  # would block a plain open()
    real = os.path.realpath(root)
    assert read_upload(str(root / 'abc' / 'ok.png'), real) == b'fine'
    assert read_upload(str(root / 'abc' / 'inner_link.png'), real) == b'fine'
    messages = set()
    for path in (tmp_path / 'outside.png', root / 'abc' / 'link.png', root / 'abc' / '..' / '..' / 'outside.png',
                 root / 'abc', root / 'abc' / 'pipe.png', root / 'abc' / 'missing.png', root, '/proc/self/environ',
                 'http://127.0.0.1/x.png', 'outside.png', ''):
        with pytest.raises(UploadRefused) as err:
            read_upload(str(path), real, name='x.png')
        messages.add(str(err.value))
    assert messages == {f'x.png: {REFUSED_TEXT}'}  # one text, whatever the path is


# ------------------------------------------------------------------ against the running app
def test_forged_paths_return_no_pixels_and_no_file_on_any_endpoint(app):
    client, root, uploads = app
    session = uuid.uuid4().hex
    for path in _forged(root, uploads, client.host):
        bodies = {
            '/gradio_api/call/on_restore': {'data': [[file_data(path)], False, False, 256, 32]},
            '/gradio_api/call/v2/on_restore': {'paths': [file_data(path)]},
            '/gradio_api/run/on_restore': {'data': [[file_data(path)], False, False, 256, 32]},
            '/gradio_api/queue/join': {'data': [[file_data(path)], False, False, 256, 32], 'fn_index': 0,
                                       'trigger_id': 0, 'session_hash': session},
        }
        for route, body in bodies.items():
            status, _, data = client.request('POST', route, body)
            assert (status, data) == (403, REFUSED), (route, path, status, data[:300])
        # a bare string instead of a file descriptor, anywhere in the body
        status, _, data = client.request('POST', '/gradio_api/call/on_restore', {'data': [path, False, False, 256, 32]})
        assert (status, data) == (403, REFUSED), (path, data[:300])
        for route in ('/gradio_api/file=', '/gradio_api/file/'):
            status, headers, data = client.request('GET', route + path)
            assert (status, data) == (404, b'Not found'), (route, path, status, data[:300])
    for token in ('0' * 24, '../../secret.png', '%2e%2e%2fsecret.png'):
        status, _, data = client.request('GET', f'/download/{token}')
        assert status == 404 and b'hunter2' not in data and b'PNG' not in data
    # nothing was copied into the upload folder either
    assert _holds_secret(uploads) is None


def test_a_normal_upload_still_restores_over_http(app):
    client, _, _ = app
    img = np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    status, paths = client.upload([('my photo.png', png(img))])
    assert status == 200 and len(paths) == 1
    _, _, status_text, downloads, before, *_ = client.restore([file_data(paths[0])])  # State, picker, ...
    assert 'Restored 1 image' in status_text and 'my_photo.png: 31x23, RGB, 8-bit' in status_text
    # the "before" image the page shows is the upload, pixel for pixel, served from the upload folder
    url = before['url'].split(client.host, 1)[1]
    status, _, data = client.request('GET', url)
    assert status == 200
    shown = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(shown, img)
    token = downloads.split('href="download/', 1)[1].split('"', 1)[0]
    status, headers, data = client.request('GET', f'/download/{token}')
    assert status == 200 and 'my_photo_restored.png' in headers['content-disposition']
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).shape == (23, 31, 3)


def test_host_header_and_cross_origin_requests_are_refused(app):
    client, _, _ = app
    port = client.port
    for path in ('/', '/config', '/gradio_api/info', '/gradio_api/upload'):
        for host in (f'evil.example:{port}', 'evil.example', f'127.0.0.1.evil.example:{port}', ''):
            status, headers, data = client.request('GET', path, host=host)
            assert status == 400 and data == b'Invalid Host header', (path, host, status)
    assert client.request('GET', '/', host=f'localhost:{port}')[0] == 200
    # a page of another origin (e.g. after DNS rebinding, or another local service) gets nothing
    for origin in ('http://evil.example', f'http://localhost:{port}', 'null'):
        status, headers, data = client.request('GET', '/config', headers={'Origin': origin})
        assert status == 403 and 'access-control-allow-origin' not in headers, (origin, status)
        status, headers, _ = client.request('OPTIONS', '/gradio_api/upload', headers={
            'Origin': origin, 'Access-Control-Request-Method': 'POST'})
        assert 'access-control-allow-origin' not in headers
    # the page's own origin works, and no CORS header is added for it either
    status, headers, _ = client.request('GET', '/config', headers={'Origin': f'http://{client.host}'})
    assert status == 200 and 'access-control-allow-origin' not in headers


def test_upload_limits(app):
    from vlunet.app import MAX_FILES, MAX_UPLOAD_BYTES
    client, _, _ = app
    small = png(np.zeros((4, 4, 3), np.uint8))
    status, body = client.upload([(f'f{i}.png', small) for i in range(MAX_FILES + 1)])
    assert status == 413 and b'Too many files' in body
    assert client.upload([(f'f{i}.png', small) for i in range(3)])[0] == 200
    # a file name chosen to escape: stored inside the upload folder under its last component
    status, stored = client.upload([('../../escape.png', small), ('/etc/cron.d/job.png', small)])
    assert status == 200 and [os.path.basename(p) for p in stored] == ['escape.png', 'job.png']
    assert all(os.path.realpath(p).startswith(app[2] + os.sep) for p in stored)
    # a declared size above the limit is refused before the body is read
    conn = http.client.HTTPConnection(*client.host.rsplit(':', 1), timeout=30)
    conn.putrequest('POST', '/gradio_api/upload', skip_host=True)
    conn.putheader('Host', client.host)
    conn.putheader('Content-Type', 'multipart/form-data; boundary=x')
    conn.putheader('Content-Length', str(MAX_UPLOAD_BYTES + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and b'Upload too large' in resp.read()
    conn.close()
    # more files than the page restores at once: refused with the reason, nothing restored
    status, paths = client.upload([(f'g{i}.png', png(np.full((4, 4, 3), i, np.uint8))) for i in range(3)])
    files = [file_data(p) for p in paths] * (MAX_FILES // 3 + 1)
    status, _, data = client.request('POST', '/gradio_api/call/on_restore', {'data': [files, False, False, 256, 32]})
    assert status == 413 and b'Too many files' in data


def test_work_limits_refuse_with_a_reason(app):
    from test_app import _png_header_only
    from vlunet.app import MAX_TILES
    client, _, _ = app
    status, paths = client.upload([('big.png', png(np.zeros((2048, 1024, 3), np.uint8))),
                                   ('bomb.png', _png_header_only(16000, 16000)),
                                   ('small.png', png(np.zeros((150, 200, 3), np.uint8)))])
    assert status == 200
    # tile 32 with overlap 31 advanced by 1 px (a 64x64 image took 93 s): refused before any work
    out = client.restore([file_data(paths[0])], tiled=True, tile=32, overlap=31)
    assert 'Restored' not in out[2] and 'advances by 1 px' in out[2] and 'at least 32 px' in out[2]
    # a valid stride that would still need thousands of tiles for this image
    out = client.restore([file_data(paths[0])], tiled=True, tile=64, overlap=32)
    assert 'big.png: 1024x2048 in tiles of 64 px with 32 px overlap makes' in out[2]
    assert f'more than this page takes per image ({MAX_TILES})' in out[2]
    # pixels from the header: refused before decoding
    out = client.restore([file_data(paths[1])])
    assert 'bomb.png: the image is 16000x16000 (256.0 megapixels), above the limit of 4.2 megapixels' in out[2]
    out = client.restore([file_data(paths[2])], tiled=True, tile=128, overlap=32)  # 4 tiles: fine
    assert 'Restored 1 image' in out[2] and 'small.png: 200x150' in out[2] and 'tiles of 128 px' in out[2]


def test_host_names_the_page_answers_to():
    from vlunet.app import RequestGuard, allowed_host_names

    def guard(host, extra=()):
        names, any_ip = allowed_host_names(host, extra)
        return RequestGuard(None, '/tmp', names, any_ip)
    loopback = guard('127.0.0.1')
    for host in ('127.0.0.1:7860', 'localhost:7860', 'LOCALHOST', '[::1]:7860'):
        assert loopback.host_allowed(host), host
    for host in ('evil.example:7860', '10.0.0.5:7860', 'localhost.evil.example', '127.0.0.1:80:80', '[::1', '',
                 None, '127.0.0.1:port'):
        assert not loopback.host_allowed(host), host
    # every interface: any IP address, this machine's names and the ones given; never another name
    wildcard = guard('0.0.0.0', ['lab.example.org'])
    for host in ('10.0.0.5:7860', '[fe80::1]:7860', 'localhost', 'lab.example.org:7860'):
        assert wildcard.host_allowed(host), host
    assert not wildcard.host_allowed('rebind.evil.example:7860')
    one = guard('192.168.1.20')
    assert one.host_allowed('192.168.1.20:7860') and not one.host_allowed('192.168.1.21:7860')
    assert not one.host_allowed('localhost:7860')

