"""What the model saw: a picture per image with every unfolding stage of VLU-Net (paper Fig. 4 style).

Drawn by ``vlunet-restore --save-stages`` and the app's stage grid from the stages that the one
restoring forward recorded (``VLUNetModel.restore(..., return_stages=True)``); nothing here runs a
network.

Rows: the input and the restored image, then one row per unfolding stage
(encoder_level1 ... refinement). Each stage row shows the features after the gradient step and
after the proximal step (the channel mean, contrast-stretched) and a bar chart of the
degradation-component weights that stage chose from the CLIP embedding.
"""
import cv2
import numpy as np

TILE = 128
BAR_W = 220
LABEL_H = 18


def _to_u8(img):
    img = np.clip(img, 0, 1)
    return (img * 255 + 0.5).astype(np.uint8)


def _feature_map(feat, size):
    """Channel mean of a (C, h, w) feature map, stretched to [0, 1], as a grey BGR tile."""
    m = feat.float().mean(0).cpu().numpy()
    lo, hi = np.percentile(m, 1), np.percentile(m, 99)
    m = (m - lo) / max(hi - lo, 1e-8)
    tile = cv2.resize(_to_u8(m), size, interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)


def _image_tile(img, size):
    bgr = cv2.cvtColor(img.float().permute(1, 2, 0).cpu().numpy(), cv2.COLOR_RGB2BGR)
    return cv2.resize(_to_u8(bgr), size, interpolation=cv2.INTER_AREA)


def _bars(weights, names, height):
    canvas = np.full((height, BAR_W, 3), 255, np.uint8)
    k = len(weights)
    row = max(1, (height - 4) // max(k, 1))
    for i, (w, name) in enumerate(zip(weights, names)):
        y = 2 + i * row
        cv2.rectangle(canvas, (90, y + 2), (90 + int(w * (BAR_W - 95)), y + row - 2), (180, 110, 40), -1)
        cv2.putText(canvas, f'{name[:13]}', (2, y + row - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.32, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return canvas


def _labelled(tile, text):
    band = np.full((LABEL_H, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([band, tile])


def stage_grid(lq, restored, stages, type_names):
    """The grid (BGR uint8) for one image: ``lq``/``restored`` (3, H, W), ``stages`` as returned by
    ``VLUNet(..., return_stages=True)`` for batch element 0."""
    h, w = lq.shape[-2:]
    scale = TILE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rows = [np.hstack([_labelled(_image_tile(lq, size), 'input'), _labelled(_image_tile(restored, size), 'restored'),
                       _labelled(np.full((size[1], BAR_W, 3), 255, np.uint8), '')])]
    for s in stages:
        weights = s['weights'][0].float().cpu().tolist()
        row = np.hstack([
            _labelled(_feature_map(s['after_gradient'][0], size), 'after gradient step'),
            _labelled(_feature_map(s['after_proximal'][0], size), 'after proximal step'),
            _labelled(_bars(weights, type_names, size[1]), 'degradation weights'),
        ])
        banner = np.full((LABEL_H + 2, row.shape[1], 3), 225, np.uint8)
        cv2.putText(banner, f'stage {s["stage"]}', (2, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.vstack([banner, row]))
    return np.vstack(rows)


def type_names(net_clip, k):
    """Short labels of the ``k`` degradation types for the bar charts: the CLIP prompts without
    'image with ' (``type 0`` ... without CLIP)."""
    names = list(net_clip.prompts) if net_clip is not None else []
    names = [n.replace('image with ', '') for n in names][:k]
    return names + [f'type {i}' for i in range(len(names), k)]
