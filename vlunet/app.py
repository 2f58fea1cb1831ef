"""``vlunet-app``: restore photos in the browser and see what the model saw (a local Gradio page).

    vlunet-app [-opt OPT] [--model CKPT] [--host 127.0.0.1] [--port 7860] [--device DEV] [--max-pixels N]
    python -m vlunet.app ...

OPT is any option file ``vlunet-restore`` accepts. Without ``-opt`` the app serves the demo model
(``experiments/VLUNet_demo/models/net_g_latest.pth`` under the working directory, with
``options/test/VLUNet_demo.yml``) and otherwise says how to make it. Needs the ``app`` extra
(``pip install -e ".[app]"``).

Every image goes through :func:`vlunet.restore.restore_image`, the function behind
``vlunet-restore``: one CLIP embedding and one network forward give the restored image, the
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
"""
import argparse
import atexit
import html
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from vlunet.restore import Restoration, build_model, restore_image, save_restored
from vlunet.utils.image_io import (IMAGE_EXTENSIONS, ImageReadError, ImageTooLargeError, image_from_bytes,
                                   is_image_file, pixel_count, read_file)

DEMO_WEIGHTS = os.path.join('experiments', 'VLUNet_demo', 'models', 'net_g_latest.pth')
DEMO_OPT = os.path.join('options', 'test', 'VLUNet_demo.yml')
DEMO_TRAIN = os.path.join('options', 'train', 'VLUNet_demo.yml')
DEFAULT_MAX_PIXELS = 2048 * 2048
MAX_UPLOAD = '256mb'      # per file, enforced by Gradio's upload route
KEEP_DOWNLOADS = 256      # restored files kept for download; older ones are deleted
EXPECTED = f'expected an image file ({" ".join(IMAGE_EXTENSIONS)}; 8- or 16-bit gray, RGB or RGBA)'


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

    def __init__(self, model, folder, max_pixels=DEFAULT_MAX_PIXELS):
        self.model = model
        self.max_pixels = max_pixels or None
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self._downloads = OrderedDict()   # token -> (path on disk, download name)
        self._lock = threading.Lock()

    def restore_upload(self, path, tile=None, tile_overlap=32, stages=False):
        """Restore one uploaded file (``path`` is where Gradio stored it); raises ImageReadError."""
        name = display_name(path)
        rgb, info = image_from_bytes(read_file(path), name, self.max_pixels)
        result = restore_image(self.model, rgb, tile, tile_overlap, stages)
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
        for path in paths or []:
            name = display_name(path)
            try:
                results.append(self.restore_upload(path, tile, tile_overlap, stages))
            except ImageTooLargeError as err:
                messages.append(f'{err}; start vlunet-app with --max-pixels N to allow larger images '
                                '(and tick "Tile large images" to bound the memory)')
            except ImageReadError as err:
                messages.append(f'{err}; {EXPECTED}')
            except Exception as err:  # noqa: BLE001  (the page shows it; the server keeps serving)
                traceback.print_exc()
                messages.append(f'{name}: could not be restored ({type(err).__name__}: {err})')
        return results, messages, time.perf_counter() - start


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
            tile_px = int(tile_px) if use_tiles and tile_px else None
            overlap_px = int(overlap_px or 0)
            if tile_px and overlap_px >= tile_px:
                return ([], gr.update(choices=[], value=None, visible=False),
                        f'The overlap ({overlap_px} px) must be smaller than the tile ({tile_px} px).', '',
                        *_detail([], None))
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


def make_app(restorer, title):
    """FastAPI app: the page at ``/`` and ``/download/<token>`` for the restored files."""
    import gradio as gr
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get('/download/{token}')
    def download(token: str):
        found = restorer.download(token)
        if found is None or not os.path.isfile(found[0]):
            raise HTTPException(404, 'no such restored file (it may have been replaced by newer ones)')
        return FileResponse(found[0], filename=found[1], media_type='application/octet-stream')

    page = build_page(restorer, title)
    page.queue(default_concurrency_limit=1)  # one restore at a time: the model uses every core
    return gr.mount_gradio_app(app, page, path='/', footer_links=[], allowed_paths=[], max_file_size=MAX_UPLOAD,
                               ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False, css=CSS,
                               show_error=False)


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
        model = build_model(opt, args.model, device)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f'error: {err.args[0] if err.args else err}', file=sys.stderr)
        return 2

    temp = tempfile.mkdtemp(prefix='vlunet-app-')
    atexit.register(shutil.rmtree, temp, True)
    os.environ['GRADIO_TEMP_DIR'] = os.path.join(temp, 'uploads')  # before Gradio is imported (make_app)
    import uvicorn
    try:
        sock = _listen(args.host, args.port)
    except OSError as err:
        print(f'error: cannot listen on {args.host}:{args.port} ({err.strerror or err}); pick another --port',
              file=sys.stderr)
        return 2

    net = type(model.get_bare_model(model.net_g)).__name__
    clip = (f'CLIP degradation report over {len(model.net_clip.prompts)} prompts' if model.net_clip is not None
            else 'no CLIP encoder: no degradation report')
    weights = args.model or f'path.pretrain_network_g of {opt}'
    limit = f'images up to {pixel_count(args.max_pixels)}' if args.max_pixels else 'no pixel limit'
    title = f'Model: **{net}** ({html.escape(weights)}), {clip}; device {device}; {limit}.'
    restorer = Restorer(model, os.path.join(temp, 'restored'), args.max_pixels)
    app = make_app(restorer, title)

    host, port = sock.getsockname()[:2]
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
