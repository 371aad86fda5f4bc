"""HumanOmni's ``all_in_one_small`` vision projector, without a timm dependency.

HumanOmni-0.5B / R1-Omni-0.5B (``mm_projector_type: "all_in_one_small"``) project SigLIP patch features
through three branches whose outputs the BERT gate mixes per sample:

* video / body: ``RegStage`` (in -> H) -> 3-D conv sampler (2x2 spatial downsample, time kept) ->
  ``RegStage`` (H -> H) -> 2-layer GELU MLP readout;
* face: a 2-layer GELU MLP on the raw patch features (the caller 2x2-pools it per frame).

HumanOmni builds its stages with ``timm.models.regnet.RegStage``. timm is not a dependency here (it pulls
torchvision, which breaks the pinned CPU torch), so ``RegStage`` below re-implements exactly the
configuration HumanOmni instantiates -- ``RegStage(depth, in_chs, out_chs, stride=1, dilation=1,
act_layer=nn.SiLU, norm_layer=LayerNorm2d)`` with timm's ``Bottleneck`` defaults -- with submodule and
parameter names equal to timm's, so a HumanOmni ``state_dict`` loads unchanged.

Names matched against timm 1.0.3 (the version pinned by HumanOmni's requirements.txt; the names are the
same in timm 0.6 - 1.0.x, later versions only add parameter-free submodules such as ``ConvNormAct.aa``).
For one stage with ``in_chs=C``, ``out_chs=H`` the state_dict keys are::

    b1.conv1.conv.weight       [H, C, 1, 1]      1x1 conv, bias=False (ConvNormAct.conv)
    b1.conv1.bn.{weight,bias}  [H]               LayerNormAct2d over channels (+SiLU), name kept ".bn"
    b1.conv2.conv.weight       [H, 1, 3, 3]      3x3 depthwise (group_size=1 -> groups=H), padding 1
    b1.conv2.bn.{weight,bias}  [H]
    b1.se.fc1.{weight,bias}    [round(C/4), H, 1, 1] / [round(C/4)]   SEModule, rd = round(in_chs * 0.25)
    b1.se.fc2.{weight,bias}    [H, round(C/4), 1, 1] / [H]
    b1.conv3.conv.weight       [H, H, 1, 1]
    b1.conv3.bn.{weight,bias}  [H]               no activation (apply_act=False)
    b1.downsample.conv.weight  [H, C, 1, 1]      only when C != H (conv1x1 shortcut); else Identity
    b1.downsample.bn.{weight,bias} [H]           no activation
    b2.*                        same with C = H and an identity shortcut (no downsample keys)

Behavioural details matched as well: timm maps ``norm_layer=LayerNorm2d`` to ``LayerNormAct2d`` whose
default eps is 1e-5 (not LayerNorm2d's 1e-6); the SE squeeze uses SiLU and a sigmoid gate; the block is
``act3(conv3(se(conv2(conv1(x)))) + downsample(x))`` with ``act3`` = SiLU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNormAct2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, then optional SiLU (timm's LayerNormAct2d)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, apply_act: bool = True) -> None:
        super().__init__(num_channels, eps=eps)
        self.act: nn.Module = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    """Bias-free conv (symmetric 'same'-ish padding) + LayerNormAct2d; attribute names ``conv`` / ``bn``."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int, groups: int = 1, apply_act: bool = True
    ) -> None:
        super().__init__()
        pad = (kernel_size - 1) // 2  # timm's default symmetric padding at stride 1
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=pad, groups=groups, bias=False)
        self.bn = LayerNormAct2d(out_chs, apply_act=apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    """Channel attention: global mean -> 1x1 conv -> SiLU -> 1x1 conv -> sigmoid scale (timm SEModule)."""

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class RegBottleneck(nn.Module):
    """timm RegNet ``Bottleneck`` at its defaults (bottle_ratio=1, group_size=1, se_ratio=0.25), stride 1."""

    def __init__(self, in_chs: int, out_chs: int, bottle_ratio: float = 1.0, group_size: int = 1,
                 se_ratio: float = 0.25) -> None:
        super().__init__()
        mid = int(round(out_chs * bottle_ratio))
        self.conv1 = ConvNormAct(in_chs, mid, 1)
        self.conv2 = ConvNormAct(mid, mid, 3, groups=mid // group_size)
        # timm sizes the SE reduction from the block's *input* width.
        self.se: nn.Module = SqueezeExcite(mid, int(round(in_chs * se_ratio))) if se_ratio else nn.Identity()
        self.conv3 = ConvNormAct(mid, out_chs, 1, apply_act=False)
        self.act3 = nn.SiLU()
        self.downsample: nn.Module = (
            ConvNormAct(in_chs, out_chs, 1, apply_act=False) if in_chs != out_chs else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(y + self.downsample(x))


class RegStage(nn.Module):
    """``depth`` bottlenecks named b1..bN; the first maps in_chs -> out_chs (NCHW in, NCHW out, same H, W)."""

    def __init__(self, depth: int, in_chs: int, out_chs: int) -> None:
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", RegBottleneck(in_chs if i == 0 else out_chs, out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def _sampler(dim: int) -> nn.Sequential:
    # time: pad 1 each side, kernel 2 -> t+1 steps (the caller drops the last); space: 2x2 stride-2 patches.
    return nn.Sequential(
        nn.Conv3d(dim, dim, kernel_size=(2, 2, 2), stride=(1, 2, 2), padding=(1, 0, 0), bias=True), nn.SiLU()
    )


def sampled_side(side: int) -> int:
    """Patches per side after the 2x2 stride-2 sampler (floor(side / 2))."""
    return (side - 2) // 2 + 1


class AllInOneSmall(nn.Module):
    """HumanOmni ``all_in_one_small``: video/body conv branches + face MLP (names as in the checkpoint)."""

    def __init__(self, in_dim: int, hidden: int, depth: int = 2) -> None:
        super().__init__()
        self.s1_video = RegStage(depth, in_dim, hidden)
        self.s1_body = RegStage(depth, in_dim, hidden)
        self.sampler_video = _sampler(hidden)
        self.sampler_body = _sampler(hidden)
        self.s2_video = RegStage(depth, hidden, hidden)
        self.s2_body = RegStage(depth, hidden, hidden)
        self.readout_video = mlp2x_gelu(hidden, hidden)
        self.readout_body = mlp2x_gelu(hidden, hidden)
        self.mlp_2xgelu_face = mlp2x_gelu(in_dim, hidden)

    @staticmethod
    def _branch(
        x: torch.Tensor, s1: nn.Module, sampler: nn.Module, s2: nn.Module, readout: nn.Module
    ) -> torch.Tensor:
        # x [b, t, (h w), d] -> [b, t' * h' * w', H]
        b, t, n, d = x.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"all_in_one_small needs a square patch grid, got {n} patches per frame")
        x = s1(x.reshape(b * t, side, side, d).permute(0, 3, 1, 2))  # (b t) d h w
        x = x.reshape(b, t, *x.shape[1:]).transpose(1, 2)  # b d t h w
        x = sampler(x)[:, :, :-1]  # drop the extra trailing time step from the temporal padding
        b, c, t2, h2, w2 = x.shape
        x = s2(x.transpose(1, 2).reshape(b * t2, c, h2, w2))  # (b t) d h w
        x = x.reshape(b, t2, c, h2, w2).permute(0, 1, 3, 4, 2).reshape(b, t2 * h2 * w2, c)  # b (t h w) d
        return readout(x)

    def forward(
        self, video: torch.Tensor, body: torch.Tensor, face: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """video, body [b, t, (h w), d]; face [(b t), n, d]
        -> video, body [b, t * h' * w', H] (h' = w' = floor(side / 2)); face [(b t), n, H]."""
        v = self._branch(video, self.s1_video, self.sampler_video, self.s2_video, self.readout_video)
        bd = self._branch(body, self.s1_body, self.sampler_body, self.s2_body, self.readout_body)
        return v, bd, self.mlp_2xgelu_face(face)
