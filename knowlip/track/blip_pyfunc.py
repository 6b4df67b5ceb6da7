"""The MLflow model a registered knowlip model is (`knowlip export --register NAME`): transformers' BLIP export
(knowlip export --format hf) behind MLflow's pyfunc interface. Normalised SAR chips and token ids in, the
normalised ITC embeddings of both out:

    model = mlflow.pyfunc.load_model("models:/sar-knowlip/1")
    out = model.predict({"pixel_values": chips, "input_ids": ids, "attention_mask": mask})
    out["image_embeds"] @ out["text_embeds"].T     # cosine similarities

This file is logged with the model ("models from code") and imports only mlflow, numpy, torch and transformers:
it loads where knowlip is not installed. pixel_values may have fewer than 3 channels (knowlip's SAR channels);
the rest are zeros, as the export's config.json "knowlip" recipe says.
"""

import mlflow
import numpy as np
import torch
import torch.nn.functional as F


class BlipEmbeddings(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from transformers import BlipForImageTextRetrieval

        self.model = BlipForImageTextRetrieval.from_pretrained(context.artifacts["blip"]).eval()

    def predict(self, context, model_input, params=None) -> dict:
        pixels = torch.as_tensor(np.asarray(model_input["pixel_values"], dtype=np.float32))
        if pixels.shape[1] < 3:
            pixels = torch.cat([pixels, pixels.new_zeros(pixels.shape[0], 3 - pixels.shape[1], *pixels.shape[2:])], 1)
        ids = torch.as_tensor(np.asarray(model_input["input_ids"], dtype=np.int64))
        mask = torch.as_tensor(np.asarray(model_input["attention_mask"], dtype=np.int64))
        m = self.model
        with torch.no_grad():
            image = m.vision_model(pixel_values=pixels).last_hidden_state[:, 0]
            text = m.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            return {"image_embeds": F.normalize(m.vision_proj(image), dim=-1).numpy(),
                    "text_embeds": F.normalize(m.text_proj(text), dim=-1).numpy()}


mlflow.models.set_model(BlipEmbeddings())
