# This example requires the following dependencies to be installed:
# pip install lightly sentence-transformers

import pytorch_lightning as pl
import torch
import torchvision
from sentence_transformers import SentenceTransformer
from torch import nn

from lightly.loss import XCLRLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms.simclr_transform import SimCLRTransform


class XCLR(pl.LightningModule):
    def __init__(self, caption_embeddings):
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = SimCLRProjectionHead(512, 2048, 2048)

        # enable gather_distributed to gather features and targets from all gpus
        # before calculating the loss
        self.criterion = XCLRLoss(
            temperature=0.1, target_temperature=0.1, gather_distributed=True
        )
        # one caption embedding per class, moved to the device with the model
        self.register_buffer("caption_embeddings", caption_embeddings)

    def forward(self, x):
        x = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(x)
        return z

    def training_step(self, batch, batch_index):
        (x0, x1), labels = batch[0], batch[1]
        targets = self.caption_embeddings[labels]
        # or use the class labels as targets for a SupCon-like loss:
        # targets = labels
        z0 = self.forward(x0)
        z1 = self.forward(x1)
        loss = self.criterion(z0, z1, targets=targets)
        return loss

    def configure_optimizers(self):
        optim = torch.optim.SGD(self.parameters(), lr=0.06)
        return optim


transform = SimCLRTransform(input_size=32)
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

model = XCLR(caption_embeddings)

dataloader = torch.utils.data.DataLoader(
    dataset,
    batch_size=256,
    shuffle=True,
    drop_last=True,
    num_workers=8,
)

# Train with DDP and use Synchronized Batch Norm for a more accurate batch norm
# calculation. Distributed sampling is also enabled with replace_sampler_ddp=True.
trainer = pl.Trainer(
    max_epochs=10,
    devices="auto",
    accelerator="gpu",
    strategy="ddp",
    sync_batchnorm=True,
    use_distributed_sampler=True,  # or replace_sampler_ddp=True for PyTorch Lightning <2.0
)
trainer.fit(model=model, train_dataloaders=dataloader)
