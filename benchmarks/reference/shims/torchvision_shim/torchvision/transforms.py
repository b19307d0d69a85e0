"""torchvision.transforms stand-in: ToTensor, Normalize, Compose; augmentations raise."""
import torch


class ToTensor:
    """uint8 (H, W) or (H, W, C) image -> float (C, H, W) in [0, 1] (divided by 255, as
    torchvision's ToTensor on a PIL image)."""

    def __call__(self, img):
        t = torch.as_tensor(img)
        if t.dim() == 2:
            t = t.unsqueeze(0)
        elif t.dim() == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)
        if t.dtype == torch.uint8:
            return t.float().div(255)
        return t.float()


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, t):
        return (t - self.mean) / self.std


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class _Unsupported:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, x):
        raise NotImplementedError(f"{type(self).__name__} is not available in the torchvision "
                                  "shim (MNIST needs no augmentation)")


class RandomCrop(_Unsupported):
    pass


class RandomHorizontalFlip(_Unsupported):
    pass


class CenterCrop(_Unsupported):
    pass


class Resize(_Unsupported):
    pass


class RandomResizedCrop(_Unsupported):
    pass
