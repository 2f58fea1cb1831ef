#!/usr/bin/env python
"""Install vlunet: ``pip install .`` (``.[app]`` adds vlunet-app; ``pip install -e .[test]`` for development)."""
from setuptools import find_packages, setup

VERSION = '0.1.0'  # keep in step with vlunet/version.py (a test checks they agree)
APP_REQUIRES = ['gradio>=6,<7', 'fastapi', 'uvicorn', 'pandas']
EXPORT_REQUIRES = ['onnx>=1.16', 'onnxscript>=0.2', 'onnxruntime>=1.17']  # vlunet-export, vlunet-restore --backend onnxruntime

with open('README.md', encoding='utf-8') as f:
    long_description = f.read()

setup(
    name='vlunet',
    version=VERSION,
    description='VLU-Net (CVPR 2025) and its peers DGUNet, Restormer and PromptIR as a BasicSR plugin',
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['vlunet', 'vlunet.*']),
    include_package_data=True,
    package_data={'vlunet': ['demo_data/*/*.png', 'archs/clip_configs/*.json']},
    install_requires=[
        'torch>=2.1',
        'torchvision>=0.16',
        'basicsr==1.4.2',
        'open_clip_torch>=2.20',
        'lmdb',
        'opencv-python',
        'pyyaml',
        'tqdm',
        'numpy',
        'scikit-image',  # the published PSNR/SSIM (vlunet/metrics); basicsr requires it as well
        'Pillow',  # truncated-JPEG check of the image reader
        'setuptools',  # basicsr imports distutils, which Python 3.12 no longer ships
    ],
    # app: vlunet-app, the local restore page (Gradio 6 built-ins: ImageSlider, BarPlot, buttons=);
    # test: everything its tests need, the app and the browser test's driver included
    extras_require={'app': APP_REQUIRES, 'export': EXPORT_REQUIRES,
                    'test': ['pytest>=7.3', 'pytest-xdist>=3', 'selenium>=4.10'] + APP_REQUIRES + EXPORT_REQUIRES},
    entry_points={
        'console_scripts': [
            'vlunet-train=vlunet.train:main',
            'vlunet-test=vlunet.test:main',
            'vlunet-convert=vlunet.convert:main',
            'vlunet-compare=vlunet.compare:main',
            'vlunet-restore=vlunet.restore:main',
            'vlunet-app=vlunet.app:main',
            'vlunet-export=vlunet.export:main',
            'vlunet-prepare=vlunet.data.prepare:main',
            'vlunet-remeasure=vlunet.remeasure:main',
            'vlunet-leaderboard=vlunet.leaderboard:main',
        ],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'License :: OSI Approved :: Apache Software License',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
)
