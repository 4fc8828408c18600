"""
The frozen teacher: tokenizers and text encoders (transformers), the noise schedule, and the DDIM ODE sampler with
classifier-free guidance that turns (noise z, prompt) into the latent x that the one-step student learns to hit.

    teacher = load_teacher("path/to/stable-diffusion-v1-5", "cuda", torch.bfloat16)   # or a hub id, or
    teacher = load_teacher("v1-5-pruned-emaonly.safetensors", tokenizer="openai/clip-vit-large-patch14")
    cond, uncond = teacher.conditions(prompts, 512, 512)          # UNet-ready dicts: context (+ pooled, time_ids)
    x = teacher.sample(z, cond, uncond, steps=50, guidance=3.0)   # DDIM from x_T = z, trailing spacing

The text conditioning is exactly what the reference pipelines feed the UNet: SD1.x and SD2.x
take the last hidden state of their (stored-penultimate, for SD2) CLIP text encoder; SDXL concatenates the
penultimate hidden states of both encoders (no final LayerNorm) and adds the pooled, projected bigG vector and six
size/crop numbers. The sampler math follows diffusers' DDIMScheduler except for one bug we do not copy: the
previous timestep is the next entry of the timestep list, not t - 1000 // steps.
"""
import hashlib
import json
import os
import re
import warnings
from contextlib import nullcontext

import numpy as np
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from weights import (check_safetensors, hub_snapshot, ldm_family, load_unet, load_vae, read_checkpoint, to_ldm,
                     unet_key_to_ldm, vae_key_to_ldm, weight_files, write_safetensors)

# -----------------------------------------------------------------------------
# noise schedule, parameterisations and the sampler (pure functions)


def make_alphas_cumprod(beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000, beta_schedule="scaled_linear"):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), computed in float32 exactly as diffusers does (SD: scaled_linear)."""
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not supported (scaled_linear or linear)")
    return torch.cumprod(1.0 - betas, dim=0)


def x0_and_eps(out, x_t, t, alphas_cumprod, prediction_type):
    """The clean latent x0 and the noise eps implied by a model output at timestep t (int or [B]), in fp32:
    eps-prediction: x0 = (x_t - sqrt(1-a) eps) / sqrt(a);  v-prediction: x0 = sqrt(a) x_t - sqrt(1-a) v,
    eps = sqrt(a) v + sqrt(1-a) x_t  (Salimans & Ho 2022), where a = alpha_bar_t."""
    out, x_t = out.float(), x_t.float()
    a = alphas_cumprod.to(x_t.device, torch.float32)[torch.as_tensor(t, device=x_t.device)]
    a = a.reshape(-1, *[1] * (x_t.dim() - 1)) if a.dim() else a
    if prediction_type == "epsilon":
        return (x_t - (1 - a) ** 0.5 * out) / a**0.5, out
    if prediction_type == "v_prediction":
        return a**0.5 * x_t - (1 - a) ** 0.5 * out, a**0.5 * out + (1 - a) ** 0.5 * x_t
    raise ValueError(f"prediction_type={prediction_type!r} is not supported (epsilon or v_prediction)")


def predict_x0(out, x_t, t, alphas_cumprod, prediction_type):
    """x0 from a UNet output (the one-step student reads its output at t=999 this way). Keep it fp32: at t=999 the
    division by sqrt(alpha_bar)=0.068 amplifies any error of eps 14.6 times."""
    return x0_and_eps(out, x_t, t, alphas_cumprod, prediction_type)[0]


def ddim_timesteps(steps, spacing="trailing", steps_offset=1, num_train_timesteps=1000):
    """The descending timesteps of a `steps`-step sampler, as diffusers spaces them: 'trailing' starts at T-1
    (999, so x_T = z is pure noise at the top of the schedule), 'leading' at (steps-1)*(T//steps) + steps_offset,
    'linspace' spreads T-1..0 evenly. (diffusers' float arange gives 'trailing' an extra step for some N: 61, 103...)"""
    T = num_train_timesteps
    if spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps))[:steps] - 1
    elif spacing == "leading":
        t = (np.arange(steps) * (T // steps)).round()[::-1] + steps_offset
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, steps).round()[::-1]
    else:
        raise ValueError(f"spacing={spacing!r}: use 'trailing', 'leading' or 'linspace'")
    return [int(v) for v in t]


@torch.no_grad()
def ddim_sample(unet, z, cond, uncond, steps=50, guidance=3.0, spacing="trailing", *, alphas_cumprod,
                prediction_type="epsilon", steps_offset=1):
    """DDIM with eta=0 (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", Eq. 12 with sigma=0): the
    deterministic solver of the probability-flow ODE, from x_T = z down to the final latent x0, with classifier-free
    guidance (Ho & Salimans 2022) in diffusers' w convention: out = out_u + w (out_c - out_u); w <= 1 runs the
    conditional model alone. unet(x, t, **cond) returns eps or v; cond and uncond are dicts of UNet inputs
    (context, and pooled/time_ids for SDXL; None entries are passed as is). Unconditional and conditional halves go
    through one batched UNet call. The state is kept in fp32, the UNet runs in the dtype of cond['context'].
    Each step: x0, eps from the output; x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, where a_prev is alpha_bar at
    the next timestep of the list, and alpha_bar[0] after the last one (set_alpha_to_one=False, as SD)."""
    ts = ddim_timesteps(steps, spacing, steps_offset, len(alphas_cumprod))
    ac = alphas_cumprod.to(z.device, torch.float32)
    use_cfg = guidance > 1
    if use_cfg:  # [uncond; cond] in one call, the order of the reference pipelines
        cond = {k: torch.cat([uncond[k], v]) if torch.is_tensor(v) else v for k, v in cond.items()}
    dtype = cond["context"].dtype
    x = z.float()
    for i, t in enumerate(ts):
        t = torch.tensor(t, device=z.device)  # a tensor: torch.compile would recompile the UNet for each int
        out = unet(torch.cat([x, x]).to(dtype) if use_cfg else x.to(dtype), t, **cond).float()
        if use_cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance * (out_c - out_u)
        x0, eps = x0_and_eps(out, x, t, ac, prediction_type)
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def one_step(unet, z, cond, alphas_cumprod, prediction_type, t=999, param="teacher", ctx=nullcontext()):
    """The one-step student G(z, c) of Kang et al. 2024 (Sec. 3): one UNet call at timestep t on pure noise z, where
    the teacher's ODE starts. param='teacher' reads the output like the teacher's (eps or v) and converts it to x0 in
    fp32: at t=999 x0 = (z - sqrt(1 - a) eps) / sqrt(a) multiplies any error of eps by 1/sqrt(a) = 14.6, so run the
    UNet (ctx) in fp16 or fp32, not bf16 (train.py's dtype_g). param='x0' reads the output as x0 directly.
    Returns the latent in the UNet's scaled space, fp32."""
    with ctx:
        out = unet(z, t, **cond)  # a scalar t: one time-embedding row for the whole batch
    return predict_x0(out.float(), z.float(), t, alphas_cumprod, prediction_type) if param == "teacher" else out.float()


def seeded_noise(seeds, shape, device="cpu"):
    """One z per seed, each from its own generator (CPU, fp32): the same images whatever the batch size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


# -----------------------------------------------------------------------------
# the teacher


class Teacher:
    """The frozen teacher: unet, vae, tokenizers and text encoders (one, or two for SDXL), and its noise schedule."""

    def __init__(self, unet, vae, tokenizers, text_encoders, alphas_cumprod, prediction_type, steps_offset=1,
                 force_zeros_for_empty_prompt=True, source=""):
        self.unet, self.vae, self.tokenizers, self.text_encoders = unet, vae, tokenizers, text_encoders
        self.alphas_cumprod, self.prediction_type, self.steps_offset = alphas_cumprod, prediction_type, steps_offset
        self.xl = len(text_encoders) == 2  # SDXL: two encoders, pooled text and time ids
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt and self.xl
        self.source = source
        self.vae_factor = 2 ** (len(vae.cfg.channels) - 1)  # image pixels per latent pixel (8 for SD)
        self.resolution = unet.cfg.sample_size * self.vae_factor  # the native image side (512, 768, 1024)
        self._uncond = {}

    @property
    def device(self):  # the text encoder's, not the UNet's: train.py moves the UNet off the GPU once it is done
        return self.text_encoders[0].get_input_embeddings().weight.device

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    def latent_shape(self, resolution=None):
        """(C, H, W) of the latent of a `resolution` (side, or (height, width)) image; None = the native size."""
        h, w = (resolution, resolution) if isinstance(resolution, int) else (resolution or (self.resolution,) * 2)
        m = self.vae_factor * 2 ** (len(self.unet.cfg.channels) - 1)  # the UNet halves the latent per level
        if h % m or w % m:
            raise ValueError(f"resolution {h}x{w} must be a multiple of {m} for this teacher")
        return self.unet.cfg.in_channels, h // self.vae_factor, w // self.vae_factor

    def tokenize(self, tokenizer, prompts):
        """Token ids padded to the tokenizer's max length (77 for SD) with its own pad token; longer prompts are
        truncated with a warning, as the reference pipelines do."""
        n = tokenizer.model_max_length
        long = [p for p, ids in zip(prompts, tokenizer(prompts, verbose=False).input_ids) if len(ids) > n]
        if long:
            warnings.warn(f"{len(long)} prompt(s) longer than {n} tokens were truncated to {n} tokens, as the "
                          f"reference pipelines do; the first: {long[0][:100]!r}")
        return tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_text(self, prompts):
        """dict(context=[B, 77, D], pooled=[B, P] for SDXL else None), in the UNet's dtype."""
        if not self.xl:  # SD1: CLIP-L's last layer after final LN; SD2: the same call on the stored 23-layer OpenCLIP-H
            ids = self.tokenize(self.tokenizers[0], prompts).to(self.device)
            return dict(context=self.text_encoders[0](ids).last_hidden_state.to(self.dtype), pooled=None)
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(self.tokenize(tokenizer, prompts).to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, no final LayerNorm
        pooled = out.text_embeds  # the second (bigG) encoder's: final LN at the EOS token, then its projection
        return dict(context=torch.cat(hidden, dim=-1).to(self.dtype), pooled=pooled.to(self.dtype))

    def uncond(self, batch, negative_prompt=""):
        """The unconditional input for guidance: the encoding of negative_prompt ("" by default), except SDXL with no
        negative prompt, whose pipeline uses zeros for the context and the pooled vector (force_zeros_for_empty_prompt).
        Encoded once at batch 1 and cached, so it never depends on the batch size."""
        if negative_prompt not in self._uncond:
            e = self.encode_text([negative_prompt])
            if negative_prompt == "" and self.force_zeros_for_empty_prompt:
                e = {k: torch.zeros_like(v) for k, v in e.items()}
            self._uncond[negative_prompt] = e
        e = self._uncond[negative_prompt]
        return {k: None if v is None else v.expand(batch, *v.shape[1:]) for k, v in e.items()}

    def time_ids(self, batch, height, width):
        """SDXL's micro-conditioning, the pipeline default (original size, crop top-left, target size) =
        (H, W, 0, 0, H, W) in pixels, shape [B, 6]; None for models without it."""
        if not self.xl:
            return None
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=self.device)
        return ids.expand(batch, 6)

    def conditions(self, prompts, height=None, width=None, negative_prompt=""):
        """UNet-ready (cond, uncond) dicts for a batch of prompts at an image size in pixels (default: native)."""
        ids = self.time_ids(len(prompts), height or self.resolution, width or self.resolution)
        return (self.encode_text(prompts) | dict(time_ids=ids),
                self.uncond(len(prompts), negative_prompt) | dict(time_ids=ids))

    def sample(self, z, cond, uncond, steps=50, guidance=3.0, spacing="trailing"):
        """ddim_sample with this teacher's UNet and schedule: the final latent x (UNet-scaled space, fp32)."""
        return ddim_sample(self.unet, z, cond, uncond, steps, guidance, spacing, alphas_cumprod=self.alphas_cumprod,
                           prediction_type=self.prediction_type, steps_offset=self.steps_offset)

    @torch.no_grad()
    def decode(self, x):
        """UNet-space latents -> images in [-1, 1] (the VAE sees latent / scaling_factor)."""
        return self.vae.decode(x.to(self.vae.post_quant_conv.weight.dtype) / self.vae.cfg.scaling_factor).float()

    def fingerprint(self, dtype=None):
        """sha256 of everything that decides the pairs: UNet and text-encoder weights (names, dtypes, shapes, bytes),
        the tokenizers' vocabularies and lengths, the noise schedule and the prediction type. Not the VAE, not file
        paths: the same teacher moved or converted to another layout has the same fingerprint. dtype: hash the weights
        as cast to it (train.py holds the teacher in fp32 and checks it against pairs made in fp16)."""
        h = hashlib.sha256()
        for name, m in [("unet", self.unet)] + [(f"text_encoder{i}", e) for i, e in enumerate(self.text_encoders)]:
            hash_weights(h, name, m, dtype)
        for tok in self.tokenizers:
            h.update(json.dumps([sorted(tok.get_vocab().items()), tok.model_max_length, tok.pad_token_id]).encode())
        h.update(self.alphas_cumprod.numpy().tobytes() + f"{self.prediction_type} {self.steps_offset}".encode())
        return h.hexdigest()


def hash_weights(h, name, module, dtype=None):
    """Feed a module's weights (names, dtypes, shapes, bytes; cast to dtype if given) into the hash h."""
    for k, v in module.state_dict().items():
        v = v.detach().to(dtype or v.dtype)
        h.update(f"{name}.{k} {v.dtype} {tuple(v.shape)}".encode())
        h.update(v.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())


# -----------------------------------------------------------------------------
# loading: a diffusers pipeline folder, a hub id, or an original single file (+ a tokenizer folder or hub id)

TOKENIZER_HINT = ("a single-file checkpoint holds no tokenizer: pass tokenizer= a folder or hub id that has one "
                  "(e.g. openai/clip-vit-large-patch14 for SD1.x, stabilityai/stable-diffusion-2-1 for SD2.x, "
                  "stabilityai/stable-diffusion-xl-base-1.0 for SDXL: it needs tokenizer/ and tokenizer_2/)")


def is_hub_id(path):
    return not os.path.exists(path) and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) is not None


def load_tokenizers(path, n):
    """n CLIP tokenizers from a pipeline folder (tokenizer/, tokenizer_2/), a tokenizer folder, or a hub id."""
    if is_hub_id(path):
        path = hub_snapshot(path, ["tokenizer/*", "tokenizer_2/*", "vocab.json", "merges.txt", "tokenizer.json",
                                   "tokenizer_config.json", "special_tokens_map.json"])
    subs = ["tokenizer", "tokenizer_2"][:n]
    if n == 1 and not os.path.isdir(os.path.join(path, "tokenizer")):
        subs = [""]  # the folder is the tokenizer itself
    for s in subs:  # (CLIPTokenizer quietly builds an empty vocabulary from a folder without its files)
        files = os.listdir(os.path.join(path, s)) if os.path.isdir(os.path.join(path, s)) else []
        if not ("tokenizer.json" in files or {"vocab.json", "merges.txt"} <= set(files)):
            raise FileNotFoundError(f"{path}: no {s or 'tokenizer'}/ folder here (with vocab.json and merges.txt, or "
                                    "tokenizer.json); " + TOKENIZER_HINT)
    return [CLIPTokenizer.from_pretrained(os.path.join(path, s)) for s in subs]


OPENCLIP_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj", "token_embedding": "embeddings.token_embedding",
                  "ln_final": "final_layer_norm", "transformer.resblocks": "encoder.layers"}  # OpenCLIP -> HF


def clip_from_state(sd, source, tokenizer, openclip, projection=False, drop_last=False):
    """A transformers CLIP text model from a text-encoder state dict in HF naming (SD1, SDXL's first encoder) or in
    OpenCLIP naming (SD2, SDXL's bigG, converted by rule). The config comes from the tensor shapes; heads are 64 wide
    in every SD text encoder (CLIP-L 12, OpenCLIP-H 16, bigG 20)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        if k in ("embeddings.position_ids", "logit_scale") or (k == "text_projection" and not projection):
            continue
        if openclip:
            if k == "positional_embedding":
                k = "embeddings.position_embedding.weight"
            elif k == "text_projection":
                k, v = "text_projection.weight", v.t()  # OpenCLIP: x @ P; a Linear stores P^T
            for a, b in OPENCLIP_NAMES.items():
                k = re.sub(rf"(^|\.){re.escape(a)}\.", rf"\g<1>{b}.", k)
            if m := re.fullmatch(r"(.*)\.attn\.in_proj_(weight|bias)", k):  # fused q, k, v rows
                for name, part in zip("qkv", v.chunk(3)):
                    out[f"{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
                continue
        out[k] = v
    layers = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("encoder.layers."))
    if drop_last:  # SD2 conditions on the penultimate layer: diffusers stores the model without the last one
        out = {k: v for k, v in out.items() if not k.startswith(f"encoder.layers.{layers - 1}.")}
        layers -= 1
    vocab, width = out["embeddings.token_embedding.weight"].shape
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                         intermediate_size=out["encoder.layers.0.mlp.fc1.weight"].shape[0],
                         num_attention_heads=max(1, width // 64), hidden_act="gelu" if openclip else "quick_gelu",
                         max_position_embeddings=out["embeddings.position_embedding.weight"].shape[0],
                         projection_dim=out["text_projection.weight"].shape[0] if projection else width,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    if projection:
        out = {(k if k == "text_projection.weight" else "text_model." + k): v for k, v in out.items()}
    try:
        model.load_state_dict(out, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: the text encoder does not fit a CLIP text model: {str(e)[:600]}") from None
    return model


def clip_to_state(model, openclip, add_last=False):
    """The inverse of clip_from_state: a transformers CLIP text model's weights in single-file naming, HF's
    (text_model.*, with the position_ids buffer the original files carry) or OpenCLIP's (fused q, k, v rows; the
    projection as P, not P^T). add_last: append the last layer that SD2 files hold and SD2 does not read (drop_last)."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    if not openclip:
        ids = torch.arange(sd["embeddings.position_embedding.weight"].shape[0])[None]
        return {"text_model." + k: v for k, v in sd.items()} | {"text_model.embeddings.position_ids": ids}
    out = {}
    for k, v in sd.items():
        if k == "embeddings.position_embedding.weight":
            k = "positional_embedding"
        elif k == "text_projection.weight":
            k, v = "text_projection", v.t()
        for a, b in OPENCLIP_NAMES.items():
            k = re.sub(rf"(^|\.){re.escape(b)}\.", rf"\g<1>{a}.", k)
        if m := re.fullmatch(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)", k):  # fused in q, k, v order
            out.setdefault(f"{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = v
            continue
        out[k] = v
    out = {k: torch.cat([v[c] for c in "qkv"]) if isinstance(v, dict) else v for k, v in out.items()}
    if add_last:  # no copy of the dropped layer is kept, so write zeros: a residual block with zero weights is the
        # identity, so a tool that reads the last layer (not SD2's penultimate) gets the same features too
        last = max(int(k.split(".")[2]) for k in out if k.startswith("transformer.resblocks."))
        block = f"transformer.resblocks.{last}."
        out |= {k.replace(block, f"transformer.resblocks.{last + 1}."): torch.zeros_like(v)
                for k, v in out.items() if k.startswith(block)}
    return out


def single_file_state(teacher, unet):
    """The original single-file (LDM) state dict of `unet` with the teacher's VAE and text encoders, in the layout
    load_teacher reads (and A1111, ComfyUI and diffusers' from_single_file): the inverse of its single-file branch.
    An OpenCLIP text encoder (gelu, as clip_from_state builds it) is SD2's; two encoders are SDXL's."""
    sd = to_ldm(unet.state_dict(), "model.diffusion_model.", unet_key_to_ldm, unet.cfg)
    sd |= to_ldm(teacher.vae.state_dict(), "first_stage_model.", vae_key_to_ldm, teacher.vae.cfg)
    te = teacher.text_encoders
    if teacher.xl:
        parts = {"conditioner.embedders.0.transformer.": clip_to_state(te[0], False),
                 "conditioner.embedders.1.model.": clip_to_state(te[1], True)}
    elif te[0].config.hidden_act == "gelu":
        parts = {"cond_stage_model.model.": clip_to_state(te[0], True, add_last=True)}
    else:
        parts = {"cond_stage_model.transformer.": clip_to_state(te[0], False)}
    for prefix, part in parts.items():
        sd |= {prefix + k: v for k, v in part.items()}
    return sd


def save_single_file(teacher, unet, path, metadata=None):
    """Write single_file_state to path (.safetensors), atomically."""
    write_safetensors(single_file_state(teacher, unet), path, metadata)


def check_folder_weights(folder):
    """Read the headers of a model folder's safetensors files: a file cut short then stops the load with its name,
    not with transformers' traceback deep in the loading code."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            check_safetensors(os.path.join(folder, name))


def load_teacher(path, device="cpu", dtype=torch.float32, tokenizer=None, prediction_type=None, variant=None,
                 unet_config=None, vae_config=None):
    """The frozen teacher from a diffusers pipeline folder, a hub id (only the needed files are downloaded), or an
    original single file (.safetensors/.ckpt; then tokenizer= a tokenizer folder or hub id is required, and
    prediction_type is a guess unless given: SD2.x files are taken as v-prediction, SD2.1-base is not). Everything
    is in eval mode with requires_grad False; unet_config/vae_config override the detected configs (see model.py)."""
    if not os.path.exists(path) and not is_hub_id(path):
        raise FileNotFoundError(f"{path}: no such file or folder (and not a hub id like org/name)")
    root, sched, force_zeros, sd = path, {}, True, None
    if os.path.isfile(path):
        if tokenizer is None:
            raise ValueError(f"{path}: " + TOKENIZER_HINT)
        sd = read_checkpoint(path)
        family = ldm_family(sd)
        if family is None:
            raise ValueError(f"{path}: not an SD1/SD2/SDXL checkpoint with text encoders")
        tokenizers = load_tokenizers(tokenizer, 2 if family == "sdxl" else 1)

        def part(prefix):  # one text encoder's tensors, prefix removed
            out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if not out:
                raise ValueError(f"{path}: no text-encoder weights under {prefix}*; a UNet-only file needs a diffusers "
                                 "pipeline folder or a full single-file checkpoint (UNet, VAE and text encoders)")
            return out
        if family == "sdxl":
            encoders = [clip_from_state(part("conditioner.embedders.0.transformer."), path, tokenizers[0], False),
                        clip_from_state(part("conditioner.embedders.1.model."), path, tokenizers[1], True, True)]
        elif family == "sd21":
            encoders = [clip_from_state(part("cond_stage_model.model."), path, tokenizers[0], True, drop_last=True)]
        else:
            encoders = [clip_from_state(part("cond_stage_model.transformer."), path, tokenizers[0], False)]
        sched["prediction_type"] = "v_prediction" if family == "sd21" else "epsilon"
    else:
        if is_hub_id(path):
            patterns = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*"]
            for sub, stem in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                              ("text_encoder", "model"), ("text_encoder_2", "model")]:
                patterns += [f"{sub}/{f}" for f in ["config.json"] + weight_files(stem, variant)]
            root = hub_snapshot(path, patterns)
        if not os.path.isdir(os.path.join(root, "text_encoder")):
            raise FileNotFoundError(f"{path}: no text_encoder/ folder: not a diffusers text-to-image pipeline")
        xl = os.path.isdir(os.path.join(root, "text_encoder_2"))
        tokenizers = load_tokenizers(tokenizer or root, 2 if xl else 1)
        kw = dict(variant=variant) if variant else {}
        for sub in ["text_encoder", "text_encoder_2"][:1 + xl]:
            check_folder_weights(os.path.join(root, sub))
        encoders = [CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder"), **kw)]
        if xl:
            encoders.append(CLIPTextModelWithProjection.from_pretrained(os.path.join(root, "text_encoder_2"), **kw))
        sched = read_json(os.path.join(root, "scheduler", "scheduler_config.json"))
        force_zeros = read_json(os.path.join(root, "model_index.json")).get("force_zeros_for_empty_prompt", True)
        for key in ["rescale_betas_zero_snr", "trained_betas"]:
            if sched.get(key):
                raise ValueError(f"{root}/scheduler/scheduler_config.json: {key} is not supported")
    unet = load_unet(root, unet_config, dtype, variant, sd=sd)
    vae = load_vae(root, vae_config, torch.float32, variant, sd=sd)
    if not (vae.cfg.force_upcast and dtype == torch.float16):  # SDXL's VAE overflows in fp16: there keep it in fp32,
        vae = vae.to(dtype)  # unrounded (like diffusers' SDXL pipeline, which upcasts for fp16 only, not bf16)
    sd = None  # (a single file is read once, above; free what no model took over)
    encoders = [e.to(device, dtype) for e in encoders]
    for m in [unet.to(device), vae.to(device), *encoders]:
        m.eval().requires_grad_(False)
    ac = make_alphas_cumprod(sched.get("beta_start", 0.00085), sched.get("beta_end", 0.012),
                             sched.get("num_train_timesteps", 1000), sched.get("beta_schedule", "scaled_linear"))
    # steps_offset only moves 'leading' timesteps; every SD scheduler config says 1
    return Teacher(unet, vae, tokenizers, encoders, ac, prediction_type or sched.get("prediction_type", "epsilon"),
                   sched.get("steps_offset", 1), force_zeros, source=path)


def read_json(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
