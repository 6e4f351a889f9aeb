"""Low-dose and sparse-view CT denoising with a U-Net (see docs/denoising.md).

Submodules are imported on use; importing ``denoise`` loads neither torch nor pydicom.
"""
