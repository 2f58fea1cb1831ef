"""``vlunet-app``: restore photos in the browser and see what the model saw (a local Gradio page).

    vlunet-app [-opt OPT] [--model CKPT] [--host 127.0.0.1] [--port 7860] [--device DEV] [--max-pixels N]
    python -m vlunet.app ...

OPT is any option file ``vlunet-restore`` accepts. Without ``-opt`` the app serves the demo model
(``experiments/VLUNet_demo/models/net_g_latest.pth`` under the working directory, with
``options/test/VLUNet_demo.yml``) and otherwise says how to make it. Needs the ``app`` extra
(``pip install -e ".[app]"``).

Every image goes through the one inference engine (:class:`vlunet.inference.RestorationEngine`),
as in ``vlunet-restore``: one CLIP embedding and one network forward give the restored image, the
degradation report and, on request, the stage grid. The page shows the restored image at its own
resolution beside the input, a before/after slider, the CLIP probability of each degradation
prompt as a bar chart (models with ``network_clip``), the stage grid, the time taken, and a
download of the restored file at the input's size, kind and bit depth.

Local only: it binds 127.0.0.1 unless told otherwise, opens no share link, sends no analytics and
makes no network call (the page's scripts, styles and fonts come from the installed package).
Uploads are kept by Gradio in a temporary folder of this process, removed at exit; vlunet never
builds a path from an uploaded file's name: restored files are written under random names and the
(sanitised) original name is only what the browser saves the download as. Images above
``--max-pixels`` (default 2048 x 2048 = 4.2 megapixels) are refused from their header, before
decoding: un-tiled, the demo-sized VLU-Net needs about 2 GB of memory per megapixel on a CPU.

The page serves only what it was given (:class:`RequestGuard`, in front of every route, and
:func:`read_upload`, in front of every read): a file named in a request must be a regular file
inside this process's upload folder (real path: ``..`` and links resolved) or the request is
refused before anything is opened, with the same words whether or not the path exists; the
``Host`` header must name the address the page is bound to (``--allowed-host`` adds names, e.g.
behind a proxy), cross-origin requests are refused and no CORS origin is echoed. Uploads are
limited in files and bytes per request, and each request's work is bounded: tiles advance by at
least :data:`MIN_TILE_STRIDE` pixels (and half a tile), at most :data:`MAX_TILES` tiles per image,
at most :data:`MAX_QUEUE` requests waiting.
"""
import argparse
import atexit
import html
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from vlunet.inference import Restoration
from vlunet.restore import build_engine, save_restored
from vlunet.utils.tiling import check_tiling, tile_count
from vlunet.utils.image_io import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageReadError, ImageTooLargeError,
                                   image_from_bytes, is_image_file, pixel_count, read_file)

DEMO_WEIGHTS = os.path.join('experiments', 'VLUNet_demo', 'models', 'net_g_latest.pth')
DEMO_OPT = os.path.join('options', 'test', 'VLUNet_demo.yml')
DEMO_TRAIN = os.path.join('options', 'train', 'VLUNet_demo.yml')
MAX_FILE_BYTES = 64 * 2**20        # per uploaded file (Gradio's upload route and read_upload)
MAX_UPLOAD_BYTES = 256 * 2**20     # per upload request
MAX_FILES = 32                     # files per upload request and per restore request
MAX_JSON_BYTES = 2**20             # body of any other request
MIN_TILE_STRIDE = 32               # tiles advance by at least this (and by half a tile) ...
MAX_TILES = 1024                   # ... and one image is at most this many tiles
MAX_QUEUE = 16                     # requests waiting for the one worker
KEEP_DOWNLOADS = 256               # restored files kept for download; older ones are deleted
EXPECTED = f'expected an image file ({" ".join(IMAGE_EXTENSIONS)}; 8- or 16-bit gray, RGB or RGBA)'
REFUSED = 'refused: not a file uploaded to this page'   # the same words whether or not the path exists


def display_name(path):
    """The upload's file name, for showing and as the download name only: letters, digits, ``.``,
    ``_`` and ``-``, at most 80 characters before the extension; never used as a path."""
    name = re.sub(r'[^A-Za-z0-9._-]+', '_', os.path.basename(str(path))).strip('._') or 'image'
    stem, ext = os.path.splitext(name)
    return (stem[:80] or 'image') + ext[:8]


def kind_of(info):
    channels = {1: 'gray', 3: 'RGB', 4: 'RGBA'}.get(info['channels'], f'{info["channels"]}-channel')
    return f'{channels}, {16 if info["dtype"] == np.uint16 else 8}-bit'


def _preview(rgb):
    """uint8 RGB picture of a float RGB image in [0, 1] (what the page displays)."""
    return np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


@dataclass
class PageResult:
    """One restored upload, as the page shows it."""

    name: str                 # sanitised upload name
    width: int
    height: int
    kind: str                 # 'RGB, 8-bit', 'gray, 16-bit', ...
    restoration: Restoration
    input_preview: np.ndarray
    token: str                # key of the download (a random name, not derived from the upload)
    download_name: str


class Restorer:
    """The page's work, without Gradio: read uploads, restore them, keep the downloads.

    ``run(paths, ...)`` returns ``(results, messages, seconds)``: one :class:`PageResult` per image
    restored and one readable message per file that was not (naming it and what was expected).
    Restored files are written with the one atomic writer under random names in ``folder``.
    """

    def __init__(self, engine, folder, max_pixels=DEFAULT_MAX_PIXELS, upload_dir=None, max_files=MAX_FILES,
                 min_tile_stride=MIN_TILE_STRIDE, max_tiles=MAX_TILES):
        self.engine = engine
        self.max_pixels = max_pixels or None
        self.folder = folder
        # None: read any path (library use); the page sets it to Gradio's upload folder
        self.upload_dir = os.path.realpath(upload_dir) if upload_dir else None
        self.max_files, self.min_tile_stride, self.max_tiles = max_files, min_tile_stride, max_tiles
        os.makedirs(folder, exist_ok=True)
        self._downloads = OrderedDict()   # token -> (path on disk, download name)
        self._lock = threading.Lock()

    def read(self, path):
        """The bytes of an upload: only a regular file inside ``upload_dir`` when that is set."""
        if self.upload_dir is None:
            return read_file(path)
        return read_upload(path, self.upload_dir, display_name(path))

    def check_work(self, count, tile, tile_overlap):
        """None, or why a request of ``count`` files with these tiles is refused (before any is read)."""
        if count > self.max_files:
            return f'{count} files in one request; the page restores at most {self.max_files} at a time'
        if tile:
            stride = max(self.min_tile_stride, tile // 2)
            problem = check_tiling(tile, tile_overlap, stride, names=('the tile', 'the overlap'))
            if problem:
                return f'{problem}. Tiles must advance by at least {stride} px on this page'
        return None

    def restore_upload(self, path, tile=None, tile_overlap=32, stages=False):
        """Restore one uploaded file (``path`` is where Gradio stored it); raises ImageReadError."""
        name = display_name(path)
        rgb, info = image_from_bytes(self.read(path), name, self.max_pixels)
        if tile and self.max_tiles and tile_count(*rgb.shape[:2], tile, tile_overlap) > self.max_tiles:
            n = tile_count(*rgb.shape[:2], tile, tile_overlap)
            raise ImageReadError(f'{name}: {rgb.shape[1]}x{rgb.shape[0]} in tiles of {tile} px with {tile_overlap} px '
                                 f'overlap makes {n} tiles, more than this page takes per image ({self.max_tiles}); '
                                 'use larger tiles, a smaller overlap, or no tiling', 'too many tiles')
        result = self.engine.restore(rgb, tile, tile_overlap, stages)
        stem, ext = os.path.splitext(name)
        ext = ext.lower() if is_image_file(name) else '.png'
        token = secrets.token_hex(12)
        try:
            disk = os.path.join(self.folder, token + ext)
            save_restored(disk, result, info)
        except OSError:  # a format OpenCV cannot write this kind in: PNG keeps every kind
            ext = '.png'
            disk = os.path.join(self.folder, token + ext)
            save_restored(disk, result, info)
        download_name = f'{stem}_restored{ext}'
        self._keep(token, disk, download_name)
        return PageResult(name, rgb.shape[1], rgb.shape[0], kind_of(info), result, _preview(rgb), token,
                          download_name)

    def _keep(self, token, disk, download_name):
        with self._lock:
            self._downloads[token] = (disk, download_name)
            while len(self._downloads) > KEEP_DOWNLOADS:
                old, _ = self._downloads.popitem(last=False)[1]
                if os.path.exists(old):
                    os.unlink(old)

    def download(self, token):
        """``(path, download name)`` of a restored file, or None for an unknown token."""
        with self._lock:
            return self._downloads.get(token)

    def run(self, paths, tile=None, tile_overlap=32, stages=False):
        start = time.perf_counter()
        results, messages = [], []
        refused = self.check_work(len(paths or []), tile, tile_overlap)
        if refused:
            return results, [f'{refused}.'], time.perf_counter() - start
        for path in paths or []:
            name = display_name(path)
            try:
                results.append(self.restore_upload(path, tile, tile_overlap, stages))
            except ImageTooLargeError as err:
                messages.append(f'{err}; start vlunet-app with --max-pixels N to allow larger images '
                                '(and tick "Tile large images" to bound the memory)')
            except UploadRefused as err:
                messages.append(str(err))
            except ImageReadError as err:
                messages.append(f'{err}; {EXPECTED}' if err.reason != 'too many tiles' else str(err))
            except Exception as err:  # noqa: BLE001  (the page shows it; the server keeps serving)
                traceback.print_exc()
                messages.append(f'{name}: could not be restored ({type(err).__name__}: {err})')
        return results, messages, time.perf_counter() - start


# ------------------------------------------------------------------ what the page may read and serve
class UploadRefused(ImageReadError):
    """A path that is not a file uploaded to this page (the message never says whether it exists)."""


def _within(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def confined_path(path, root):
    """The real path of ``path`` when it is a file inside ``root`` (a real path), else None.

    Decided from the text first (``..`` resolved, nothing outside ``root`` is looked at), then
    from the real path (links resolved), so a link inside the folder cannot lead out of it."""
    if not isinstance(path, str) or not path or '\0' in path or '://' in path or path.startswith(('data:', '~')):
        return None
    absolute = os.path.abspath(path)
    if not _within(absolute, root) or absolute == root:
        return None
    real = os.path.realpath(absolute)
    if not _within(real, root) or real == root:
        return None
    return real


def read_upload(path, root, name=None, max_bytes=MAX_FILE_BYTES):
    """The bytes of ``path`` if it is a regular file inside the upload folder ``root``; otherwise
    :class:`UploadRefused`, with one text whatever the reason (outside, link out, missing, a folder,
    a device), so the answer tells nothing about the server's files."""
    name = name or display_name(path)
    refused = UploadRefused(f'{name}: {REFUSED}', REFUSED)
    real = confined_path(path, root)
    if real is None:
        raise refused
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
    except OSError:
        raise refused from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise refused
    with os.fdopen(fd, 'rb') as f:
        if info.st_size > max_bytes:
            raise ImageReadError(f'{name}: {info.st_size} bytes, more than this page takes per file ({max_bytes})',
                                 'too large')
        return f.read(max_bytes + 1)


def _file_data(node, loose):
    """Every dict in a request's values that names a file (Gradio's FileData: a ``path``, or
    meta._type); other strings go to ``loose`` (the page takes no text: a string there could only be
    a path that Gradio might resolve on its own)."""
    if isinstance(node, dict):
        meta = node.get('meta')
        if 'path' in node or (isinstance(meta, dict) and meta.get('_type') == 'gradio.FileData'):
            yield node
            return
        for value in node.values():
            yield from _file_data(value, loose)
    elif isinstance(node, list):
        for value in node:
            yield from _file_data(value, loose)
    elif isinstance(node, str):
        loose.append(node)


def _host_name(value):
    """'example.org' of 'Example.org:7860', '::1' of '[::1]:7860' (lower case); None if malformed."""
    value = (value or '').strip().lower()
    if value.startswith('['):
        end = value.find(']')
        rest = value[end + 1:] if end > 0 else None
        if rest is None or (rest and not (rest[0] == ':' and rest[1:].isdigit())):
            return None
        return value[1:end]
    name, _, port = value.partition(':')
    if ':' in port or (port and not port.isdigit()):
        return None
    return name or None


def _is_ip(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def allowed_host_names(host, extra=()):
    """Host names the page answers to when bound to ``host``: that address; for loopback also
    ``localhost``; for every interface (0.0.0.0, ::) any IP address and this machine's names."""
    names = {n.lower() for n in extra}
    loopback = {'127.0.0.1', 'localhost', '::1'}
    wildcard = host in ('0.0.0.0', '::', '')
    names.add(host.lower().strip('[]'))
    if host in loopback or (_is_ip(host) and ipaddress.ip_address(host).is_loopback):
        names |= loopback
    if wildcard:
        names |= loopback | {socket.gethostname().lower(), socket.getfqdn().lower()}
    return names, wildcard


def _plain(status, text):
    body = text.encode()
    start = {'type': 'http.response.start', 'status': status,
             'headers': [(b'content-type', b'text/plain; charset=utf-8'), (b'content-length', str(len(body)).encode()),
                         (b'x-content-type-options', b'nosniff'), (b'cache-control', b'no-store')]}
    return start, {'type': 'http.response.body', 'body': body}


class _Refuse(Exception):
    def __init__(self, status, text):
        super().__init__(text)
        self.status, self.text = status, text


class RequestGuard:
    """ASGI middleware in front of the whole app (every Gradio route and ``/download``).

    - ``Host`` must be one of :func:`allowed_host_names` (DNS rebinding); a request with an
      ``Origin`` is answered only when it is this page's own (no cross-origin use, no CORS echo).
    - ``/gradio_api/file=...`` serves only regular files inside the upload folder; every other
      path gets the same 404, before anything is opened.
    - Any other POST under ``/gradio_api/`` is read (at most :data:`MAX_JSON_BYTES`), and every file
      it names must be inside the upload folder (at most :data:`MAX_FILES`), or the request is
      refused before Gradio sees it (so nothing is copied, fetched or opened).
    - Uploads: at most :data:`MAX_UPLOAD_BYTES` and :data:`MAX_FILES` files per request.
    - Routes the page does not use that read files or fetch URLs are not served.
    """

    DENIED = ('/gradio_api/proxy=', '/gradio_api/process_recording', '/gradio_api/vibe', '/gradio_api/undo-vibe',
              '/gradio_api/dev/', '/gradio_api/run-history', '/gradio_api/runs', '/gradio_api/mcp',
              '/gradio_api/custom_component', '/monitoring', '/gradio_api/monitoring', '/docs', '/openapi.json')
    FILE_ROUTES = ('/gradio_api/file=', '/gradio_api/file/')

    def __init__(self, app, upload_dir, host_names, any_ip=False, max_files=MAX_FILES,
                 max_upload_bytes=MAX_UPLOAD_BYTES, max_json_bytes=MAX_JSON_BYTES):
        self.app = app
        self.root = os.path.realpath(upload_dir)
        self.host_names, self.any_ip = set(host_names), any_ip
        self.max_files, self.max_upload_bytes, self.max_json_bytes = max_files, max_upload_bytes, max_json_bytes

    def host_allowed(self, host):
        name = _host_name(host)
        return name is not None and (name in self.host_names or (self.any_ip and _is_ip(name)))

    async def __call__(self, scope, receive, send):
        if scope['type'] not in ('http', 'websocket'):
            return await self.app(scope, receive, send)
        hosts = [v.decode('latin-1') for k, v in scope['headers'] if k.lower() == b'host']
        origins = [v.decode('latin-1') for k, v in scope['headers'] if k.lower() == b'origin']
        try:
            if len(hosts) != 1 or not self.host_allowed(hosts[0]):
                raise _Refuse(400, 'Invalid Host header')
            if origins and (len(origins) != 1 or urlsplit(origins[0]).netloc.lower() != hosts[0].strip().lower()):
                raise _Refuse(403, 'Cross-origin request refused')
            if scope['type'] == 'websocket':
                return await self.app(scope, receive, send)
            path = scope['path']
            if path.startswith(self.DENIED):
                raise _Refuse(404, 'Not found')
            if path.startswith(self.FILE_ROUTES):
                named = path.split('=', 1)[1] if path.startswith('/gradio_api/file=') else path[len('/gradio_api/file/'):]
                real = confined_path(named, self.root)
                if real is None or not os.path.isfile(real):
                    raise _Refuse(404, 'Not found')
            elif scope['method'] == 'POST' and path.rstrip('/') == '/gradio_api/upload':
                return await self._upload(scope, receive, send)
            elif scope['method'] not in ('GET', 'HEAD', 'OPTIONS'):
                body = await self._read_body(scope, receive)
                self._check_files(body)
                receive = _replay(body, receive)
        except _Refuse as refusal:
            if scope['type'] == 'websocket':
                return await send({'type': 'websocket.close', 'code': 1008})
            for message in _plain(refusal.status, refusal.text):
                await send(message)
            return
        return await self.app(scope, receive, send)

    async def _read_body(self, scope, receive):
        chunks, size = [], 0
        while True:
            message = await receive()
            if message['type'] == 'http.disconnect':
                raise _Refuse(400, 'Incomplete request')
            chunk = message.get('body', b'')
            size += len(chunk)
            if size > self.max_json_bytes:
                raise _Refuse(413, f'Request too large (limit {self.max_json_bytes} bytes)')
            chunks.append(chunk)
            if not message.get('more_body', False):
                return b''.join(chunks)

    def _check_files(self, body):
        if not body.strip():
            return
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _Refuse(400, 'Expected a JSON body') from None
        loose = []
        # the values of the page's inputs: 'data' (queue/join, call, run), the keyword arguments (call/v2)
        values = data.get('data', data) if isinstance(data, dict) else data
        files = list(_file_data(values, loose))
        if len(files) > self.max_files:
            raise _Refuse(413, f'Too many files in one request (limit {self.max_files})')
        if loose:
            raise _Refuse(403, 'Refused: the request names a file that was not uploaded to this page')
        for entry in files:
            real = confined_path(entry.get('path'), self.root)
            if real is None or not os.path.isfile(real):
                raise _Refuse(403, 'Refused: the request names a file that was not uploaded to this page')

    async def _upload(self, scope, receive, send):
        headers = {k.lower(): v for k, v in scope['headers']}
        try:
            declared = int(headers.get(b'content-length', b''))
        except ValueError:
            declared = None
        refusal = None
        if declared is None:
            refusal = _Refuse(411, 'Uploads need a Content-Length')
        elif declared > self.max_upload_bytes:
            refusal = _Refuse(413, f'Upload too large (limit {self.max_upload_bytes} bytes per request)')
        if refusal is not None:
            for message in _plain(refusal.status, refusal.text):
                await send(message)
            return
        boundary = re.search(rb'boundary="?([^";]+)"?', headers.get(b'content-type', b''))
        delimiter = b'--' + (boundary.group(1) if boundary else b'')
        state = {'bytes': 0, 'delimiters': 0, 'tail': b'', 'refused': None, 'started': False}

        async def counted():
            message = await receive()
            if message['type'] == 'http.request':
                chunk = state['tail'] + message.get('body', b'')
                state['bytes'] += len(message.get('body', b''))
                state['delimiters'] += chunk.count(delimiter) - state['tail'].count(delimiter)
                state['tail'] = chunk[-(len(delimiter) - 1):] if len(delimiter) > 1 else b''
                if state['bytes'] > min(declared, self.max_upload_bytes):
                    state['refused'] = _Refuse(413, f'Upload too large (limit {self.max_upload_bytes} bytes)')
                elif state['delimiters'] - 1 > self.max_files:
                    state['refused'] = _Refuse(413, f'Too many files in one upload (limit {self.max_files})')
                if state['refused'] is not None:
                    raise state['refused']
            return message

        async def guarded_send(message):
            if state['refused'] is None:
                state['started'] = True
                await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if state['refused'] is None:
                raise
        if state['refused'] is not None and not state['started']:
            for message in _plain(state['refused'].status, state['refused'].text):
                await send(message)


def _replay(body, receive):
    """A ``receive`` that gives ``body`` once, then waits on the real one (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {'type': 'http.request', 'body': body, 'more_body': False}
        return await receive()
    return replay


# ---------------------------------------------------------------------------------------- the page
CSS = """
.natural-size img { width: auto !important; height: auto !important; max-width: none !important;
                    max-height: none !important; object-fit: none !important; }
.natural-size .image-container, .natural-size .image-frame { overflow: auto; max-height: 560px; }
#status ul { margin-top: 0.2em; }
"""


def _status(results, messages, seconds, tile):
    lines = []
    if results:
        lines.append(f'**Restored {len(results)} image{"s" * (len(results) != 1)} in {seconds:.2f} s**'
                     + (f' (tiles of {tile} px)' if tile else ''))
        lines += [f'- {html.escape(r.name)}: {r.width}x{r.height}, {r.kind}, {r.restoration.seconds:.2f} s'
                  + (f'; most likely: {html.escape(r.restoration.top_type)}' if r.restoration.report else '')
                  + (f'; {html.escape(r.restoration.tiling)}' if r.restoration.tiles > 1 else '')
                  for r in results]
    if messages:
        lines.append(f'**Not restored ({len(messages)}):**')
        lines += [f'- {html.escape(m)}' for m in messages]
    return '\n'.join(lines) or 'Upload one or more images, then press **Restore**.'


def _downloads_html(results):
    if not results:
        return ''
    links = ''.join(f'<li><a href="download/{r.token}" download="{html.escape(r.download_name, quote=True)}">'
                    f'{html.escape(r.download_name)}</a> ({r.width}x{r.height}, {r.kind})</li>' for r in results)
    return f'<div id="download-list"><b>Download the restored files</b> (original size, kind and bit depth):' \
           f'<ul>{links}</ul></div>'


def _detail(results, index):
    """Values of the detail components for result ``index``."""
    import gradio as gr
    import pandas as pd
    if not results or index is None or not 0 <= int(index) < len(results):
        return (None, None, None, gr.update(value=None, visible=False), '', gr.update(value=None, visible=False),
                '')
    r = results[int(index)]
    res = r.restoration
    restored = _preview(res.image)
    if res.report:
        frame = pd.DataFrame({'prompt': list(res.report), 'probability': [round(p, 4) for p in res.report.values()]})
        chart = gr.update(value=frame, visible=True)
        p = res.report[res.top_type]
        top = f'Most likely degradation: **{html.escape(res.top_type)}** (CLIP probability {p:.0%})'
    else:
        chart = gr.update(value=None, visible=False)
        top = 'This model has no CLIP encoder (`network_clip`), so there is no degradation report.'
    if res.stage_grid is not None:
        stages = gr.update(value=res.stage_grid[..., ::-1], visible=True)
    else:
        stages = gr.update(value=None, visible=False)
    caption = f'{r.name}: {r.width}x{r.height} ({r.kind}), restored in {res.seconds:.2f} s' + (
        f'. {html.escape(res.note)}' if res.note else '')
    return r.input_preview, restored, (r.input_preview, restored), chart, top, stages, caption


def build_page(restorer, title):
    """The Gradio Blocks of the page (one "Restore" button)."""
    import gradio as gr
    with gr.Blocks(title='VLU-Net restore', analytics_enabled=False) as page:
        gr.Markdown(f'## VLU-Net: restore your photos\n{title}')
        results = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label='Images (one or several)', file_count='multiple', type='filepath',
                                elem_id='upload')
                with gr.Accordion('Options', open=True):
                    want_stages = gr.Checkbox(label='Show what the model saw (stage grid)', value=False,
                                              elem_id='want-stages')
                    tiled = gr.Checkbox(label='Tile large images', value=False, elem_id='tiled')
                    with gr.Row():
                        tile = gr.Number(label='Tile (px)', value=256, minimum=32, precision=0)
                        overlap = gr.Number(label='Overlap (px)', value=32, minimum=0, precision=0)
                run = gr.Button('Restore', variant='primary', elem_id='restore')
            with gr.Column(scale=2):
                status = gr.Markdown('Upload one or more images, then press **Restore**.', elem_id='status')
                picker = gr.Dropdown(label='Show', choices=[], visible=False, elem_id='picker', interactive=True)
                downloads = gr.HTML('', elem_id='downloads')
                caption = gr.Markdown('', elem_id='caption')
        with gr.Row():
            before = gr.Image(label='Input (actual pixels)', type='numpy', format='png', interactive=False,
                              buttons=['fullscreen'], elem_id='input-image', elem_classes=['natural-size'])
            after = gr.Image(label='Restored (actual pixels)', type='numpy', format='png', interactive=False,
                             buttons=['fullscreen'], elem_id='restored', elem_classes=['natural-size'])
        with gr.Row():
            compare = gr.ImageSlider(label='Before / after', type='numpy', format='png', interactive=False,
                                     elem_id='compare', scale=3)
            with gr.Column(scale=2):
                top = gr.Markdown('', elem_id='top-type')
                chart = gr.BarPlot(x='prompt', y='probability', title='CLIP probability of each degradation prompt',
                                   y_lim=[0, 1], sort='-y', x_label_angle=-60, height=380, visible=False,
                                   elem_id='report')
        stages = gr.Image(label='What the model saw: every unfolding stage (features after the gradient and '
                                'proximal steps, degradation weights)', type='numpy', format='png',
                          interactive=False, visible=False, buttons=['download', 'fullscreen'], elem_id='stages')
        detail = [before, after, compare, chart, top, stages, caption]

        def on_restore(paths, show_stages, use_tiles, tile_px, overlap_px):
            paths = list(paths) if isinstance(paths, (list, tuple)) else ([paths] if paths else [])
            try:
                tile_px = int(tile_px) if use_tiles and tile_px else None
                overlap_px = int(overlap_px or 0)
            except (TypeError, ValueError, OverflowError):  # what the form never sends, a script might
                found, messages, seconds = [], ['The tile and overlap must be whole numbers of pixels.'], 0.0
            else:
                found, messages, seconds = restorer.run(paths, tile_px, overlap_px, bool(show_stages))
            if not paths:
                messages = ['No file uploaded: add one or more images first.']
            choices = [(f'{i + 1}. {r.name}', i) for i, r in enumerate(found)]
            picker_update = gr.update(choices=choices, value=0 if found else None, visible=len(found) > 1)
            return (found, picker_update, _status(found, messages, seconds, tile_px), _downloads_html(found),
                    *_detail(found, 0 if found else None))

        run.click(on_restore, [files, want_stages, tiled, tile, overlap],
                  [results, picker, status, downloads, *detail], show_progress='minimal')
        picker.input(_detail, [results, picker], detail)
    return page


def make_app(restorer, title, host='127.0.0.1', allowed_hosts=(), upload_dir=None):
    """The ASGI app: the page at ``/`` and ``/download/<token>`` for the restored files, behind a
    :class:`RequestGuard` for the address ``host`` it is bound to (``allowed_hosts``: more names)."""
    import gradio as gr
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse
    from gradio.utils import get_upload_folder
    from starlette.middleware.cors import CORSMiddleware

    upload_dir = os.path.realpath(upload_dir or get_upload_folder())
    os.makedirs(upload_dir, exist_ok=True)
    if restorer.upload_dir is None:
        restorer.upload_dir = upload_dir
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    # a CORS policy of our own (no origin allowed) replaces Gradio's, which echoes any origin when the
    # Host header is not a localhost name (what a DNS-rebinding page sends)
    app.add_middleware(CORSMiddleware, allow_origins=[], allow_credentials=False)

    @app.get('/download/{token}')
    def download(token: str):
        found = restorer.download(token) if re.fullmatch(r'[0-9a-f]{24}', token) else None
        if found is None or not os.path.isfile(found[0]):
            raise HTTPException(404, 'no such restored file (it may have been replaced by newer ones)')
        return FileResponse(found[0], filename=found[1], media_type='application/octet-stream')

    page = build_page(restorer, title)
    # one restore at a time (the model uses every core), and a bounded line behind it
    page.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    app = gr.mount_gradio_app(app, page, path='/', footer_links=[], allowed_paths=[], max_file_size=MAX_FILE_BYTES,
                              ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False, css=CSS,
                              show_error=False, run_history=False)
    # Gradio checks that a file named in a request was uploaded (processing_utils._check_allowed) only
    # once launch() has run; mounted, the page never calls launch(), so say it has
    page.has_launched = True
    names, any_ip = allowed_host_names(host, allowed_hosts)
    return RequestGuard(app, upload_dir, names, any_ip)


# ---------------------------------------------------------------------------------------- command
def _find_demo_options():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the clone, for editable installs
    for path in (DEMO_OPT, os.path.join(here, DEMO_OPT)):
        if os.path.isfile(path):
            return path
    return None


def _no_demo_message():
    return (f'error: no -opt given and no demo model at {DEMO_WEIGHTS} (working directory: {os.getcwd()}).\n'
            f'Train it first (about 3 minutes on 2 CPU cores), from the clone:\n'
            f'    vlunet-train -opt {DEMO_TRAIN}\n'
            f'then run vlunet-app from the same folder, or pass your own model: vlunet-app -opt OPTIONS.yml '
            f'[--model CKPT]')


def _offline_environment():
    """Before Gradio is imported: no analytics, no share link, no Hugging Face Hub calls."""
    os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'
    os.environ['HF_HUB_OFFLINE'] = '1'
    os.environ['HF_HUB_DISABLE_TELEMETRY'] = '1'
    os.environ.pop('GRADIO_SHARE', None)


def _listen(host, port):
    """A bound, listening socket (port 0: any free port); OSError names what failed."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def main(argv=None):
    parser = argparse.ArgumentParser(prog='vlunet-app', description=__doc__.split('\n\n')[0])
    parser.add_argument('-opt', help='train or test option file, as for vlunet-restore (default: the demo model)')
    parser.add_argument('--model', help='network_g weights (overrides path.pretrain_network_g)')
    parser.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this machine only)')
    parser.add_argument('--port', type=int, default=7860, help='port (default 7860; 0 picks a free one)')
    parser.add_argument('--device', default=None, help="'cpu', 'cuda', 'cuda:1' ... (default: cuda if available)")
    parser.add_argument('--max-pixels', type=int, default=DEFAULT_MAX_PIXELS,
                        help=f'refuse images with more pixels (default {DEFAULT_MAX_PIXELS}; 0: no limit)')
    parser.add_argument('--allowed-host', action='append', default=[], metavar='NAME',
                        help='also answer requests whose Host header names NAME (e.g. the name of a reverse proxy); '
                             'the bound address (and localhost for 127.0.0.1) always works')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow full unpickling of a checkpoint that holds more than tensors (this runs code '
                             'stored in the file: only for files from a source you trust)')
    parser.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                        help='autocast precision of the network (fp16 only where the device computes in float16)')
    parser.add_argument('--max-memory', metavar='SIZE',
                        help='memory budget, e.g. 3G: images that would not fit run in tiles sized from the measured '
                             'memory of the network (the status says so)')
    args = parser.parse_args(argv)

    opt = args.opt
    if opt is None:
        if not os.path.isfile(DEMO_WEIGHTS):
            print(_no_demo_message(), file=sys.stderr)
            return 2
        opt = _find_demo_options()
        if opt is None:
            print(f'error: found {DEMO_WEIGHTS} but not its option file {DEMO_OPT}; pass it: '
                  f'vlunet-app -opt path/to/{DEMO_OPT}', file=sys.stderr)
            return 2
    if args.max_pixels < 0:
        print(f'error: --max-pixels must be >= 0 (0: no limit), got {args.max_pixels}', file=sys.stderr)
        return 2

    _offline_environment()
    missing = [name for name in ('gradio', 'fastapi', 'uvicorn', 'pandas') if importlib.util.find_spec(name) is None]
    if missing:
        print(f'error: vlunet-app needs the app extra (missing: {", ".join(missing)}); install it with: '
              'pip install -e ".[app]"', file=sys.stderr)
        return 2

    import torch
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        engine = build_engine(opt, args.model, device, trust_pickle=args.trust_pickle, precision=args.precision,
                              max_memory=args.max_memory)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f'error: {err.args[0] if err.args else err}', file=sys.stderr)
        return 2

    temp = os.path.realpath(tempfile.mkdtemp(prefix='vlunet-app-'))
    atexit.register(shutil.rmtree, temp, True)
    os.environ['GRADIO_TEMP_DIR'] = os.path.join(temp, 'uploads')  # before Gradio is imported (make_app)
    import uvicorn
    try:
        sock = _listen(args.host, args.port)
    except OSError as err:
        print(f'error: cannot listen on {args.host}:{args.port} ({err.strerror or err}); pick another --port',
              file=sys.stderr)
        return 2

    net = engine.network_name
    clip = (f'CLIP degradation report over {len(engine.prompts)} prompts' if engine.prompts
            else 'no CLIP encoder: no degradation report')
    weights = args.model or f'path.pretrain_network_g of {opt}'
    limit = f'images up to {pixel_count(args.max_pixels)}' if args.max_pixels else 'no pixel limit'
    budget = f'; memory budget {html.escape(args.max_memory)} (larger images run in tiles)' if args.max_memory else ''
    title = f'Model: **{net}** ({html.escape(weights)}), {clip}; device {device}, {args.precision}; {limit}{budget}.'
    restorer = Restorer(engine, os.path.join(temp, 'restored'), args.max_pixels, upload_dir=os.path.join(temp, 'uploads'))
    host, port = sock.getsockname()[:2]
    app = make_app(restorer, title, args.host, [*args.allowed_host, host], upload_dir=os.path.join(temp, 'uploads'))

    shown = f'[{host}]' if ':' in host else host
    print(f'vlunet-app: serving {net} on http://{shown}:{port}/ (Ctrl+C stops it)', flush=True)
    if args.host not in ('127.0.0.1', 'localhost', '::1'):
        print(f'warning: bound to {args.host}: other machines on the network can reach this page', flush=True)
    config = uvicorn.Config(app, log_level='warning', access_log=False, lifespan='on')
    # uvicorn shuts down on SIGINT/SIGTERM and then re-raises the signal to the previous handler:
    # make that handler an ordinary exit, so the temporary folder is removed (atexit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
