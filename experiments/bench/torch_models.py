"""PyTorch twins of jaxprune.models' CIFAR VGG (linear classifier) and ResNet (shortcut option A:
subsample and zero-pad), for the throughput comparisons; the library never imports torch."""

from torch import nn
from torch.nn import functional as F

VGG16 = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)


def conv_bn(cin, cout, stride=1):
  return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]


class VGG(nn.Module):
  def __init__(self, cfg=VGG16, num_classes=10):
    super().__init__()
    layers, c = [], 3
    for item in cfg:
      layers += [nn.MaxPool2d(2, 2)] if item == 'M' else conv_bn(c, item) + [nn.ReLU(True)]
      c = c if item == 'M' else item
    self.features = nn.Sequential(*layers)
    self.head = nn.Linear(c, num_classes)

  def forward(self, x):
    return self.head(self.features(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.stride, self.pad = stride, cout - cin
    self.conv1, self.bn1 = conv_bn(cin, cout, stride)
    self.conv2, self.bn2 = conv_bn(cout, cout)

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    shortcut = x[:, :, ::self.stride, ::self.stride]
    if self.pad:
      shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
    return F.relu(y + shortcut)


class ResNet(nn.Module):
  def __init__(self, depth=56, widths=(16, 32, 64), num_classes=10):
    super().__init__()
    n = (depth - 2) // 6
    self.stem, self.stem_bn = conv_bn(3, widths[0])
    blocks, c = [], widths[0]
    for s, w in enumerate(widths):
      for b in range(n):
        blocks.append(BasicBlock(c, w, 2 if s > 0 and b == 0 else 1))
        c = w
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(c, num_classes)

  def forward(self, x):
    return self.head(self.blocks(F.relu(self.stem_bn(self.stem(x)))).mean(dim=(2, 3)))


MODELS = {'vgg16': VGG, 'resnet56': ResNet}


def build(name: str) -> nn.Module:
  model = MODELS[name]()
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      # jaxprune's conv init: variance scaling 2.0, fan_out, normal (Kaiming normal, fan_out).
      nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
  return model
