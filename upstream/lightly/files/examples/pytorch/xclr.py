# This example requires the following dependencies to be installed:
# pip install lightly sentence-transformers

# Note: The model and training settings do not follow the reference settings
# from the paper. The settings are chosen such that the example can easily be
# run on a small dataset with a single GPU.

import torch
import torchvision
from sentence_transformers import SentenceTransformer
from torch import nn

from lightly.loss import XCLRLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms.simclr_transform import SimCLRTransform


class XCLR(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(512, 512, 128)

    def forward(self, x):
        x = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(x)
        return z


resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-1])
model = XCLR(backbone)

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

transform = SimCLRTransform(input_size=32, gaussian_blur=0.0)
dataset = torchvision.datasets.CIFAR10(
    "datasets/cifar10", download=True, transform=transform
)

# X-CLR uses how similar the descriptions of two images are as soft targets.
# Here each image is described by a caption of its class, embedded once by a
# frozen sentence encoder. With one caption per image, embed each image's own
# caption instead.
text_encoder = SentenceTransformer("all-MiniLM-L6-v2", device="cpu")
captions = [f"a photo of a {class_name}" for class_name in dataset.classes]
caption_embeddings = torch.from_numpy(text_encoder.encode(captions))

dataloader = torch.utils.data.DataLoader(
    dataset,
    batch_size=256,
    shuffle=True,
    drop_last=True,
    num_workers=8,
)

criterion = XCLRLoss(temperature=0.1, target_temperature=0.1)

optimizer = torch.optim.SGD(model.parameters(), lr=0.06)

print("Starting Training")
for epoch in range(10):
    total_loss = 0
    for batch in dataloader:
        (x0, x1), labels = batch[0], batch[1]
        x0 = x0.to(device)
        x1 = x1.to(device)
        targets = caption_embeddings[labels].to(device)
        # or use the class labels as targets for a SupCon-like loss:
        # targets = labels.to(device)
        z0 = model(x0)
        z1 = model(x1)
        loss = criterion(z0, z1, targets=targets)
        total_loss += loss.detach()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    avg_loss = total_loss / len(dataloader)
    print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}")
