"""The bundled demo model: its world, its grading, its training script and its prompt adherence."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pipelines.config import AppConfig, DEMO_MODEL_DIR
from pipelines.manager import PipelineManager
from pipelines.requests import Txt2ImgRequest
from tools.demo_world import COLORS, POSITIONS, SHAPES, Scene, analyze, random_scene, render


def test_grader_reads_rendered_scenes_exactly():
    """The evaluation is only as good as its image analysis: check it on ground truth."""
    rng = random.Random(0)
    for i in range(120):
        color, background = rng.sample(sorted(COLORS), 2)
        position = sorted(POSITIONS)[i % 5] if i % 2 else None
        scene = Scene(color, SHAPES[i % 3], background, position)
        got = analyze(render(scene, 256, rng))
        assert (got.color, got.background, got.shape) == (color, background, scene.shape), (scene, got)
        if position:
            assert got.position == position, (scene, got)


def test_object_grid_puts_every_object_on_whole_latent_cells_of_the_same_world():
    """``--object-grid 8`` draws the world's objects with their boxes on 8 px cells: still a
    side of 30-50% of the image, still graded as the scene says, at both training sizes."""
    from tools.demo_world import snap_to_grid

    rng = random.Random(3)
    sides = set()
    for size in (256, 128):
        for i in range(60):
            color, background = rng.sample(sorted(COLORS), 2)
            scene = Scene(color, SHAPES[i % 3], background, sorted(POSITIONS)[i % 5] if i % 2 else None)
            image = render(scene, size, rng, grid=8)
            differs = np.nonzero((image != np.asarray(COLORS[background], np.uint8)).any(-1))
            top, bottom = differs[0].min(), differs[0].max() + 1
            left, right = differs[1].min(), differs[1].max() + 1
            if scene.shape == "square":  # every edge on the grid, nothing anti-aliased
                assert top % 8 == bottom % 8 == left % 8 == right % 8 == 0, (scene, top, bottom, left, right)
                assert bottom - top == right - left
                sides.add((size, (right - left) // 8))
                assert 0.30 * size <= right - left <= 0.50 * size
            got = analyze(image)
            assert (got.color, got.background, got.shape) == (color, background, scene.shape), (scene, got)
            if scene.position:
                assert got.position == scene.position, (scene, got)
    big, small = {s for z, s in sides if z == 256}, {s for z, s in sides if z == 128}
    assert big <= set(range(10, 17)) and len(big) >= 4 and small <= set(range(5, 9)) and len(small) >= 3, sides
    # The draws are those of the ungridded world, only rounded: the same RNG state afterwards.
    a, b = random.Random(9), random.Random(9)
    render(Scene("red", "square", "blue", None), 256, a, grid=8)
    render(Scene("red", "square", "blue", None), 256, b)
    assert a.getstate() == b.getstate()
    with pytest.raises(ValueError, match="grid: 100 px cells leave no side of 30-50% of a 128 px image"):
        snap_to_grid(0.4, 0.5, 0.5, 128, 100)


def test_training_refuses_an_object_grid_that_leaves_no_object_size(capsys):
    from tools.train_demo_model import parse_args

    for value, message in (("200", "--object-grid: grid: 200 px cells leave no side of 30-50% of a 256 px image"),
                           ("-1", "--object-grid: the cell size must be 0 (off) or a positive number of pixels, got -1")):
        with pytest.raises(SystemExit):
            parse_args(["--object-grid", value])
        assert message in capsys.readouterr().err


def test_every_training_stage_draws_on_the_object_grid(tmp_path, monkeypatch):
    import tools.train_demo_model as training

    grids = []

    def recording_render(scene, size, rng, supersample=2, grid=0):
        grids.append((size, grid))
        return render(scene, size, rng, supersample, grid)

    def recording_box(scene, rng, size=256, grid=0):  # the VAE stage's crops: their box, then render_box
        grids.append((size, grid))
        return object_box(scene, rng, size, grid)

    from tools.demo_world import object_box

    monkeypatch.setattr(training, "render", recording_render)
    monkeypatch.setattr(training, "object_box", recording_box)
    training.main(["--smoke", "--quiet", "--object-grid", "8", "--lowres-steps", "1", "--second-cycle-steps", "1",
                   "--out", str(tmp_path / "demo")])
    # VAE, decoder, text pretraining data, both UNet sizes, the second cycle and stage 3's pairs.
    assert {size for size, _ in grids} == {32, 64} and len(grids) > 40
    assert {grid for _, grid in grids} == {8}


def _card_command(folder) -> list[str]:
    """The training command a model card gives, as the script's arguments."""
    import shlex

    line = next(l for l in (folder / "README.md").read_text().splitlines()
                if l.startswith("    python tools/train_demo_model.py "))
    return shlex.split(line)[2:]


def test_recipe_shipped_is_the_bundled_models_command_and_options_beside_it_win(monkeypatch, capsys):
    import tools.train_demo_model as training

    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: True)
    card = _card_command(DEMO_MODEL_DIR)  # the first command the card gives: the weights' base run
    assert "--outline-steps" in card and "--bf16" in card  # the card is the shipped run's, not a default one
    # ... which training.json's lineage records for the weights the shipped ones continue.
    record = json.loads((DEMO_MODEL_DIR / "training.json").read_text())
    assert record["init_from_training"]["args"]["command"] == "python tools/train_demo_model.py " + " ".join(card)
    assert record["args"]["outline_steps"] == 800 and record["args"]["unet_steps"] == 0  # stage 4 alone on it
    by_card, by_recipe = vars(training.parse_args(card)), vars(training.parse_args(["--recipe", "shipped"]))
    for name in ("argv", "recipe"):
        by_card.pop(name), by_recipe.pop(name)
    assert by_recipe == by_card
    # Options beside the recipe override it, in either spelling and position.
    for argv in (["--recipe", "shipped", "--outline-steps", "0", "--no-bf16"],
                 ["--no-bf16", "--outline-steps", "0", "--recipe=shipped"],
                 ["--rec", "shipped", "--outline-steps", "0", "--no-bf16"]):  # argparse's abbreviation too
        args = training.parse_args(argv)
        assert (args.outline_steps, args.bf16, args.unet_steps, args.lowres_size) == (0, False, 1800, 128)
    assert training.parse_args([]).unet_steps != 1800  # the defaults stay the script's own
    with pytest.raises(SystemExit):
        training.parse_args(["--recipe", "fastest"])
    assert "argument --recipe: invalid choice: 'fastest' (choose from 'shipped')" in capsys.readouterr().err


def test_bf16_is_refused_where_the_cpu_would_only_emulate_it(monkeypatch, capsys):
    """On a CPU without native bfloat16 (an AVX2-only EPYC here) bf16 autocast ran a VAE step ten
    times slower than float32: a run that fits two hours would take most of a day. Say so at
    once, with the option that fixes it, rather than after hours."""
    import tools.train_demo_model as training

    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: False)
    for argv in (["--bf16"], ["--recipe", "shipped"]):
        with pytest.raises(SystemExit):
            training.parse_args(argv)
        err = capsys.readouterr().err
        assert "--bf16: this CPU has no bfloat16 path in oneDNN" in err and "add --no-bf16" in err
    assert training.parse_args(["--recipe", "shipped", "--no-bf16"]).bf16 is False
    assert training.parse_args(["--bf16", "--smoke"]).bf16 is True  # a few steps: emulation costs nothing there
    assert training.parse_args(["--bf16", "--device", "cuda"]).bf16 is True  # not the CPU's to judge
    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: True)
    assert training.parse_args(["--bf16"]).bf16 is True


def test_the_shipped_recipe_trains_end_to_end_in_smoke_mode_and_the_card_spells_it_out(tmp_path):
    """Every stage the shipped run uses (text pretraining, the 128 px stage, the second cycle,
    stages 3 and 4, checkpoints), through the same code at smoke size; the card gives the
    recipe's options written out, so it reproduces without this version's RECIPES table."""
    import shlex

    import tools.train_demo_model as training

    out = training.main(["--recipe", "shipped", "--smoke", "--quiet", "--out", str(tmp_path / "demo")])
    argv = _card_command(out)
    given = ["--recipe", "shipped", "--smoke", "--quiet", "--out", str(tmp_path / "demo")]
    assert argv == shlex.split(training.RECIPES["shipped"]) + given
    # Without the recipe table the written-out options alone give the same run.
    written_out = vars(training.parse_args(argv[:-len(given)] + given[2:]))
    assert {k: v for k, v in written_out.items() if k not in ("argv", "recipe")} == {
        k: v for k, v in vars(training.parse_args(given)).items() if k not in ("argv", "recipe")}
    stats = json.loads((out / "training.json").read_text())["stats"]
    assert {"text_pretrain_heldout_shape", "vae_heldout_l1_uint8"} <= set(stats), sorted(stats)
    assert any("outline" in k for k in stats), sorted(stats)
    manager = PipelineManager(AppConfig(model=str(out), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    config = manager.pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr) == ("v_prediction", True)


def test_smoke_training_writes_a_model_the_studio_loads(tmp_path):
    from tools.train_demo_model import main as train

    out = train(["--smoke", "--quiet", "--out", str(tmp_path / "demo")])
    card = (out / "README.md").read_text()
    assert card.count("parameters") >= 1
    # The card gives the training command exactly as it was run.
    assert f"    python tools/train_demo_model.py --smoke --quiet --out {tmp_path / 'demo'}\n" in card
    assert not (out / "vae-stage1").exists()
    manager = PipelineManager(AppConfig(model=str(out), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    assert manager.info.source.kind == "folder" and manager.native_size == 64
    config = manager.pipe.scheduler.config  # the defaults keep SD 1.x's schedule (the shipped weights are v-pred: see the card)
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "epsilon", False, "leading")
    result = manager.txt2img(Txt2ImgRequest(prompt="a red circle on a blue background", steps=2, seed=1))
    assert np.asarray(result.images[0]).shape == (64, 64, 3)


def test_training_continues_from_an_earlier_run_and_refuses_a_mismatched_one(tmp_path):
    from tools.train_demo_model import main as train

    vpred = ["--prediction-type", "v_prediction", "--zero-terminal-snr"]
    first = train(["--smoke", "--quiet", *vpred, "--out", str(tmp_path / "a")])
    second = train(["--smoke", "--quiet", *vpred, "--seed", "1", "--init-from", str(first), "--out", str(tmp_path / "b")])
    # The continuation trains on latents at the scale its UNet learnt, the parent's, not one
    # re-estimated on its own (other) data.
    def latent_scale(folder):
        return json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]

    assert latent_scale(second) == latent_scale(first)
    assert json.loads((second / "training.json").read_text())["stats"]["vae_scaling_factor"] == latent_scale(first)
    # The continued v-prediction model loads through the normal loader with its schedule.
    manager = PipelineManager(AppConfig(model=str(second), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    config = manager.pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction", True, "trailing")
    image = manager.txt2img(Txt2ImgRequest(prompt="a red circle on a blue background", steps=3, seed=1)).images[0]
    pixels = np.asarray(image, dtype=np.float32)
    assert pixels.shape == (64, 64, 3) and np.isfinite(pixels).all() and pixels.std() > 0
    with pytest.raises(ValueError, match="sampler 'LMS' does not support this model's zero-terminal-SNR"):
        manager.txt2img(Txt2ImgRequest(prompt="a red circle on a blue background", sampler="LMS", steps=3, seed=1))
    from diffusers import UNet2DConditionModel

    a = UNet2DConditionModel.from_pretrained(first / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(second / "unet").state_dict()
    fresh = UNet2DConditionModel.from_pretrained(
        train(["--smoke", "--quiet", *vpred, "--seed", "1", "--out", str(tmp_path / "c")]) / "unet").state_dict()
    key = "conv_in.weight"
    # Three smoke steps move the weights a little: b is a's weights trained further, not a fresh start.
    assert float((b[key] - a[key]).abs().max()) < float((fresh[key] - a[key]).abs().max()) / 10
    assert not torch.equal(a[key], b[key])
    with pytest.raises(SystemExit, match=r"channels \[32, 64, 128\], this run asks for \[32, 64, 128, 128\]"):
        train(["--smoke", "--quiet", *vpred, "--unet-levels", "4", "--init-from", str(first), "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="trained with prediction_type='v_prediction', this run asks for 'epsilon'"):
        train(["--smoke", "--quiet", "--init-from", str(first), "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="not a diffusers model folder"):
        train(["--smoke", "--quiet", "--init-from", str(tmp_path), "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match=r"this run asks for \[48, 64, 128\] \(--unet-levels 3 --unet-first-channels 48\)"):
        train(["--smoke", "--quiet", *vpred, "--unet-first-channels", "48", "--init-from", str(first),
               "--out", str(tmp_path / "f")])
    # A continuation keeps its own copy of the weights it starts from: the start folder's files
    # rewritten in place (a plain `cp` of other weights of the same shapes) leave it unchanged.
    from tools.train_demo_model import load_stage2, parse_args

    unet, text_encoder = load_stage2(first, parse_args(["--smoke", *vpred]))
    before = {k: v.clone() for k, v in {**unet.state_dict(), **text_encoder.state_dict()}.items()}
    for component in ("unet", "text_encoder"):
        for weights in sorted((tmp_path / "c" / component).glob("*.safetensors")):
            with open(first / component / weights.name, "r+b") as fh:
                fh.write(weights.read_bytes())
    assert not torch.equal(UNet2DConditionModel.from_pretrained(first / "unet").state_dict()[key], before[key])
    after = {**unet.state_dict(), **text_encoder.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wider_first_unet_level_trains_and_loads(tmp_path, capsys):
    """--unet-first-channels widens the 32x32-latent level (where edges are drawn) and nothing else."""
    from tools.train_demo_model import build_unet, parse_args
    from tools.train_demo_model import main as train

    out = train(["--smoke", "--quiet", "--unet-first-channels", "48", "--out", str(tmp_path / "w")])
    manager = PipelineManager(AppConfig(model=str(out), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    assert list(manager.pipe.unet.config.block_out_channels) == [48, 64, 128]
    image = manager.txt2img(Txt2ImgRequest(prompt="a red square on a blue background", steps=2, seed=1)).images[0]
    assert np.asarray(image).shape == (64, 64, 3) and np.asarray(image).std() > 0
    assert "--unet-first-channels 48" in (out / "README.md").read_text()
    assert list(build_unet(64, 4).config.block_out_channels) == [32, 64, 128, 128]  # the default is unchanged
    with pytest.raises(ValueError, match="multiple of 16 .* got 40"):
        build_unet(64, 3, first_channels=40)
    with pytest.raises(SystemExit):
        parse_args(["--unet-first-channels", "40"])
    assert "--unet-first-channels: unet first-level channels must be a multiple of 16" in capsys.readouterr().err


def test_deeper_first_unet_level_trains_loads_and_is_refused_where_it_does_not_match(tmp_path, capsys):
    """--first-level-layers adds ResNets at the 32x32-latent level alone; a continuation must match it."""
    from tools.train_demo_model import build_unet, parse_args
    from tools.train_demo_model import main as train

    out = train(["--smoke", "--quiet", "--first-level-layers", "2", "--out", str(tmp_path / "w")])
    manager = PipelineManager(AppConfig(model=str(out), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    unet = manager.pipe.unet
    assert list(unet.config.layers_per_block) == [2, 1, 1]
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 1, 1]
    assert [len(b.resnets) for b in unet.up_blocks] == [2, 2, 3]  # the full-resolution up level is the last
    image = manager.txt2img(Txt2ImgRequest(prompt="a red square on a blue background", steps=2, seed=1)).images[0]
    assert np.asarray(image).shape == (64, 64, 3) and np.asarray(image).std() > 0
    assert "--first-level-layers 2" in (out / "README.md").read_text()
    assert build_unet(64, 3).config.layers_per_block == 1  # the default config is unchanged
    with pytest.raises(SystemExit, match=r"has UNet layers per block \[2, 1, 1\], this run asks for 1 "
                                         r"\(--first-level-layers 1\)"):
        train(["--smoke", "--quiet", "--init-from", str(out), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit):
        parse_args(["--first-level-layers", "0"])
    assert "--first-level-layers: the first level takes 1 to 4 ResNet layers, got 0" in capsys.readouterr().err


def test_shipped_demo_model_is_small_and_loads_like_stable_diffusion():
    files = [p for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 1024 * 1024
    assert all(p.suffix != ".bin" for p in files)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (DEMO_MODEL_DIR / sub).is_dir()


def test_training_noise_hides_the_image_mean_and_layout():
    """The low-frequency training noise adds per-image offsets (1x1) and coarse layout (2x2)."""
    from tools.train_demo_model import low_frequency_noise

    shape = (256, 4, 32, 32)
    white = low_frequency_noise(shape, torch.Generator().manual_seed(0), ())
    offset = low_frequency_noise(shape, torch.Generator().manual_seed(0), (0.3,))
    pyramid = low_frequency_noise(shape, torch.Generator().manual_seed(0), (0.0, 0.5))
    # Per-image, per-channel means: white noise averages to 1/32; the 1x1 level adds 0.3.
    assert float(white.mean(dim=(2, 3)).std()) < 0.04
    assert 0.27 < float(offset.mean(dim=(2, 3)).std()) < 0.34
    # The 2x2 level makes the left half differ from the right half; white noise barely does.
    def halves(x):
        return float((x[..., :16].mean(dim=(2, 3)) - x[..., 16:].mean(dim=(2, 3))).std())
    assert halves(white) < 0.08  # two 512-pixel means: 0.0625 expected
    assert halves(pyramid) > 0.2


def test_zero_terminal_snr_schedule_ends_in_pure_noise_and_keeps_loss_weights_finite():
    from diffusers import DDPMScheduler

    from tools.train_demo_model import min_snr_weights, scheduler_config

    t = torch.tensor([0, 500, 951, 999])
    zero = DDPMScheduler.from_config(scheduler_config("v_prediction", True))
    sd = DDPMScheduler.from_config(scheduler_config("epsilon", False))
    assert float(zero.alphas_cumprod[-1]) == 0.0  # the last training step shows no picture at all
    assert float(sd.alphas_cumprod[-1].sqrt()) == pytest.approx(0.068, abs=0.001)  # SD's shows 6.8% of it
    w = min_snr_weights(zero, t)
    assert torch.isfinite(w).all() and float(w[-1]) == 1.0 and float(w[0]) == pytest.approx(5.0 / (1 + 1 / 0.00085 - 1), rel=0.05)
    # The epsilon weights are unchanged: min(SNR, 5) / SNR.
    assert torch.allclose(min_snr_weights(sd, t)[2:], torch.ones(2))


def test_training_refuses_epsilon_with_zero_terminal_snr(capsys):
    from tools.train_demo_model import build_unet, parse_args, scheduler_config

    with pytest.raises(ValueError, match="unet levels must be 3 or 4, got 5"):
        build_unet(64, 5)
    with pytest.raises(ValueError, match="v_prediction"):
        scheduler_config("epsilon", True)
    with pytest.raises(SystemExit):
        parse_args(["--zero-terminal-snr"])  # with the default epsilon
    assert "zero terminal SNR needs --prediction-type v_prediction" in capsys.readouterr().err
    args = parse_args(["--prediction-type", "epsilon", "--no-zero-terminal-snr"])
    assert args.scheduler_config["prediction_type"] == "epsilon" and "rescale_betas_zero_snr" not in args.scheduler_config


def test_demo_model_follows_colour_shape_and_position_prompts(demo_manager):
    """16-prompt version of tools/eval_demo_model.py: colours at the issue's 95%, shape and position at 85%.

    Shape is held at the issue's 85% on these 16 (the shipped session-30 weights read 96.9% of the
    full 64, the session-27 ones 93.8%; the session-8 weights drew 14 of these 16 and 81% of the 64, the session-5 weights 13
    of 16, the session-4 weights 56% of 64). This keeps what the model does get right from regressing
    (the first bundled model scored 44% / 19% on colour / background here, the session-2 weights
    put the object at chance).
    """
    from tools.eval_demo_model import evaluate

    report = evaluate(demo_manager, n=16, steps=20, guidance=7.5, sampler="DDIM", progress=False)
    acc = report["accuracy"]
    misses = [(r["prompt"], r["read"]) for r in report["rows"] if not (r["color"] and r["background"])]
    assert acc["color"] >= 0.95 and acc["background"] >= 0.95, misses
    placed = [(r["prompt"], r["read"]["position"]) for r in report["rows"] if r["position"] is not None]
    assert len(placed) == 8 and acc["position"] >= 0.85, placed
    shapes = [(r["prompt"], r["read"]["shape"], r["read"]["fill"]) for r in report["rows"] if not r["shape"]]
    assert acc["shape"] >= 0.85, shapes
    assert demo_manager.native_size == 256
    assert demo_manager.guard.safety_status.startswith("not applicable")


def test_decoder_finetune_changes_only_the_decoder(tmp_path):
    """Stage 1b keeps the encoder, so the latent space a trained UNet works in stays exactly the same."""
    from tools.train_demo_model import build_vae, parse_args, to_tensor, train_decoder

    torch.manual_seed(0)
    vae = build_vae(64)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    image = to_tensor([render(Scene("red", "square", "blue", "center"), 64, random.Random(0))])
    with torch.no_grad():
        z_before = vae.encode(image).latent_dist.mean
    stats = train_decoder(vae, parse_args(["--smoke", "--quiet", "--decoder-steps", "2"]))
    after = vae.state_dict()
    encoder_keys = [k for k in after if k.startswith(("encoder.", "quant_conv."))]
    decoder_keys = [k for k in after if k.startswith(("decoder.", "post_quant_conv.")) and k.endswith("weight")]
    assert encoder_keys and decoder_keys
    assert all(torch.equal(before[k], after[k]) for k in encoder_keys)
    assert sum(not torch.equal(before[k], after[k]) for k in decoder_keys) == len(decoder_keys)
    with torch.no_grad():
        assert torch.equal(vae.encode(image).latent_dist.mean, z_before)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    assert np.isfinite(stats["decoder_l1"]) and stats["decoder_l1"] > 0


def test_smoke_training_with_decoder_stage_and_asymmetric_downsampling_loads(tmp_path):
    import json

    from tools.train_demo_model import main as train

    vpred = ["--prediction-type", "v_prediction", "--zero-terminal-snr"]
    out = train(["--smoke", "--quiet", *vpred, "--decoder-steps", "5", "--downsample-padding", "0",
                 "--out", str(tmp_path / "a")])
    stats = json.loads((out / "training.json").read_text())["stats"]
    assert stats["decoder_steps"] == 2  # --smoke caps the stage at two steps
    manager = PipelineManager(AppConfig(model=str(out), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    unet = manager.pipe.unet
    assert unet.config.downsample_padding == 0
    assert all(block.downsamplers[0].padding == 0 for block in unet.down_blocks if block.downsamplers)
    image = manager.txt2img(Txt2ImgRequest(prompt="a red circle in the top left on a blue background",
                                           steps=2, seed=1)).images[0]
    assert np.asarray(image).shape == (64, 64, 3)
    # Continuing with the other padding keeps the weights and switches the border handling.
    cont = train(["--smoke", "--quiet", *vpred, "--init-from", str(out), "--out", str(tmp_path / "b")])
    from diffusers import UNet2DConditionModel

    switched = UNet2DConditionModel.from_pretrained(cont / "unet")
    assert switched.config.downsample_padding == 1
    # Three smoke steps at lr 5e-4 move a weight by ~1e-3 at most; a fresh UNet would differ by ~0.1.
    earlier = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert float((switched.state_dict()["conv_in.weight"] - earlier["conv_in.weight"]).abs().max()) < 1e-2


def test_sweep_grades_a_trained_folder_like_the_evaluation(tmp_path):
    from tools.sweep_demo_model import grade_folder
    from tools.train_demo_model import main as train

    out = train(["--smoke", "--quiet", "--out", str(tmp_path / "a")])
    report = grade_folder(out, n=4, device="cpu", batch=2)
    assert set(report["accuracy"]) == {"color", "background", "shape", "position"}
    assert all(0 <= v <= 100 for v in report["accuracy"].values())
    assert report["worst"] == min(report["accuracy"]["shape"], report["accuracy"]["position"])
    assert 0 <= report["median_fill"] <= 1


def test_sweep_reports_how_far_an_unfinished_recipe_got():
    from tools.sweep_demo_model import last_progress

    log = "parameters: {}\rencode: 100%|##| 188/188\runet+text:   9%|#| 377/4000 [00:30<05:19, 11.34it/s]\r"
    assert last_progress(log).startswith("unet+text:   9%|#| 377/4000")
    assert last_progress("reusing the VAE of x\n") == "no progress bar yet"


def test_page_starts_on_ddim_for_a_zero_snr_model_and_on_euler_a_otherwise(demo_manager, tiny_manager):
    """Euler a, the usual default, is weaker on the zero-terminal-SNR demo model; both tabs start on DDIM there."""
    import gradio as gr

    from ui.app import build_app

    for manager, expected in ((demo_manager, "DDIM"), (tiny_manager, "Euler a")):
        assert manager.default_sampler == expected
        app = build_app(manager)
        samplers = [b for b in app.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Sampler"]
        assert len(samplers) == 2 and {d.value for d in samplers} == {expected}
        # The API's default follows the page: a script that leaves the sampler out gets it too.
        api = app.get_api_info()["named_endpoints"]
        for endpoint in ("/txt2img", "/canvas"):
            sampler = next(p for p in api[endpoint]["parameters"] if p["parameter_name"] == "sampler")
            assert sampler["parameter_default"] == expected


def test_averaging_two_runs_gives_their_mean_and_a_loadable_model(tmp_path, capsys):
    """tools/average_demo_weights.py: the shipped weights are the average of two continuations."""
    import json

    from safetensors.torch import load_file

    from tools.average_demo_weights import main as average
    from tools.train_demo_model import main as train

    vpred = ["--prediction-type", "v_prediction", "--zero-terminal-snr"]
    a = train(["--smoke", "--quiet", *vpred, "--out", str(tmp_path / "a")])
    b = train(["--smoke", "--quiet", *vpred, "--low-freq-noise", "0,0,0", "--out", str(tmp_path / "b")])
    assert average([str(a), str(b), "--out", str(tmp_path / "soup")]) == 0
    soup = tmp_path / "soup"
    for component, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        wa, wb, ws = (load_file(f / component / name) for f in (a, b, soup))
        key = next(k for k in wa if wa[k].is_floating_point() and not torch.equal(wa[k], wb[k]))
        assert torch.equal(ws[key], ((wa[key].double() + wb[key].double()) / 2).float())
    record = json.loads((soup / "training.json").read_text())
    assert record["averaged"] == [str(a), str(b)] and record["runs"][1]["args"]["low_freq_noise"] == [0.0, 0.0, 0.0]
    manager = PipelineManager(AppConfig(model=str(soup), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    image = manager.txt2img(Txt2ImgRequest(prompt="a red circle on a blue background", steps=2, seed=1)).images[0]
    assert np.asarray(image).shape == (64, 64, 3) and np.asarray(image).std() > 0

    # Runs of another noise schedule, or a single run, are refused with the reason.
    eps = train(["--smoke", "--quiet", "--out", str(tmp_path / "eps")])
    assert average([str(a), str(eps), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "scheduler/scheduler_config.json of" in err and "only runs of the same architecture" in err
    assert not (tmp_path / "bad").exists()
    assert average([str(a), "--out", str(tmp_path / "bad")]) == 2
    assert "need at least two folders to average, got 1" in capsys.readouterr().err

    # Runs with other --seed measure the same VAE's latent scale on other images: the average
    # takes their mean. A spread over 2%, or other VAE weights, means they did not share a VAE.
    import shutil

    from safetensors.torch import save_file

    def variant(name: str, scale: float | None = None, vae_nudge: bool = False) -> Path:
        folder = tmp_path / name
        shutil.copytree(b, folder)
        config_path = folder / "vae" / "config.json"
        config = json.loads(config_path.read_text())
        if scale is not None:
            config["scaling_factor"] = config["scaling_factor"] * scale
            config_path.write_text(json.dumps(config))
        if vae_nudge:
            weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
            state = load_file(weights)
            key = next(k for k in state if state[k].is_floating_point())
            state[key] = state[key] + 1e-3
            save_file(state, weights)
        return folder

    scale_a = json.loads((a / "vae" / "config.json").read_text())["scaling_factor"]
    scale_b = json.loads((b / "vae" / "config.json").read_text())["scaling_factor"]
    assert scale_a == scale_b
    assert average([str(a), str(variant("b_scaled", 1.01)), "--out", str(tmp_path / "soup2")]) == 0
    mean_scale = json.loads((tmp_path / "soup2" / "vae" / "config.json").read_text())["scaling_factor"]
    assert mean_scale == pytest.approx(scale_a * 1.005, rel=1e-9)
    assert json.loads((tmp_path / "soup2" / "training.json").read_text())["vae_scaling_factors"][0] == scale_a
    assert average([str(a), str(variant("b_far", 1.05)), "--out", str(tmp_path / "bad")]) == 2
    assert "VAE scaling factors differ by more than 2%" in capsys.readouterr().err
    assert average([str(a), str(variant("b_vae", vae_nudge=True)), "--out", str(tmp_path / "bad")]) == 2
    assert "the VAE weights of" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_unet_width_benchmark_reports_ratios_to_the_first_width():
    from tools.bench_demo_unet import main as bench

    report = bench(["--widths", "32,64", "--size", "64", "--steps", "1", "--repeats", "1", "--threads", "1"])
    base, wide = report["widths"][32], report["widths"][64]
    assert base["ratio"] == 1.0 and wide["ratio"] > 0
    assert wide["unet_params"] > base["unet_params"]  # only the first level grew
    assert wide["seconds_per_image"] > report["vae_decode_s"] > 0


def test_training_precision_benchmark_reports_bf16_as_a_ratio_to_float32(capsys):
    from pipelines.config import cpu_has_fast_bf16
    from tools.bench_train_precision import main as bench

    report = bench(["--size", "64", "--batch", "2", "--vae-crop", "32", "--vae-batch", "2", "--repeats", "1",
                    "--threads", "1"])
    assert report["native_bf16"] is cpu_has_fast_bf16()
    assert set(report["steps"]) == {"vae", "unet"}
    for step in report["steps"].values():
        assert step["fp32_s"] > 0 and step["bf16_s"] > 0
        assert step["bf16_over_fp32"] == pytest.approx(step["bf16_s"] / step["fp32_s"], rel=0.05)
    with pytest.raises(SystemExit):
        bench(["--size", "100"])
    assert "--size must be a multiple of 64, got 100" in capsys.readouterr().err


def test_logit_normal_timesteps_weight_middle_noise_and_bad_values_are_refused(capsys):
    from tools.train_demo_model import parse_args, sample_timesteps

    def draw(logit_normal, seed=0):
        return sample_timesteps(20000, 1000, 0.0, torch.Generator().manual_seed(seed), logit_normal)

    uniform, middle = draw(None), draw((0.0, 1.0))
    assert int(middle.min()) >= 0 and int(middle.max()) <= 999
    share = lambda t: float(((t >= 300) & (t < 700)).float().mean())  # noqa: E731
    # sigmoid(N(0, 1)) puts P(|N| < logit(0.7)) = 60% of the draws in the middle 40% of the range.
    assert share(uniform) == pytest.approx(0.40, abs=0.02)
    assert share(middle) == pytest.approx(0.60, abs=0.02)
    assert float(draw((1.0, 1.0)).float().mean()) > float(middle.float().mean()) + 150  # a positive mean shifts to noise
    assert torch.equal(draw((0.0, 1.0), seed=3), draw((0.0, 1.0), seed=3))
    assert parse_args(["--logit-normal-timesteps", "0,1"]).logit_normal_timesteps == (0.0, 1.0)
    assert parse_args([]).logit_normal_timesteps is None
    for bad, message in (("0", "must be MEAN,STD (two numbers), got '0'"), ("0,-1", "STD must be positive, got -1")):
        with pytest.raises(SystemExit):
            parse_args(["--logit-normal-timesteps", bad])
        assert message in capsys.readouterr().err


def test_guided_consistency_loss_is_guidance_times_the_branches_disagreement():
    """The term is zero when both branches match the target, and grows as (scale - 1)^2 times
    their disagreement when only the conditional one does: what guidance does at sampling."""
    from tools.train_demo_model import guided_consistency_loss

    target = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([1.0, 0.5, 2.0])
    assert float(guided_consistency_loss(target, target, target, weights, 7.5)) == 0.0
    off = target + 0.1  # the unconditional branch 0.1 away everywhere
    got = float(guided_consistency_loss(target, off, target, weights, 7.5))
    assert got == pytest.approx((6.5 * 0.1) ** 2 * float(weights.mean()), rel=1e-5)
    # At scale 1 guidance is the conditional prediction, and so is the term.
    assert float(guided_consistency_loss(target, off, target, weights, 1.0)) == pytest.approx(0.0, abs=1e-12)


def test_guided_loss_trains_and_the_dataset_cache_gives_the_same_run(tmp_path, capsys, caplog):
    """--guided-loss adds its term to a smoke run; --dataset-cache reuses the encoded images and
    the run that reads them is the same run, bit for bit; bad values are refused by name."""
    import json

    from safetensors.torch import load_file

    from tools.train_demo_model import main as train

    args = ["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr",
            "--guided-loss", "1", "--guided-loss-max-t", "1000"]
    plain = train([*args, "--out", str(tmp_path / "plain")])
    first = train([*args, "--dataset-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "first")])
    assert len(list((tmp_path / "cache").glob("latents-*.pt"))) == 1
    with caplog.at_level("INFO", logger="train_demo_model"):
        second = train([*args, "--dataset-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "second")])
    assert "encoded dataset read from" in caplog.text
    stats = json.loads((second / "training.json").read_text())["stats"]
    assert stats["guided_loss_last100"] > 0
    name = "unet/diffusion_pytorch_model.safetensors"
    for other in (first, second):
        a, b = load_file(plain / name), load_file(other / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Without the term the same seed trains other weights (the term took part).
    unguided = train(["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr",
                      "--out", str(tmp_path / "unguided")])
    a, b = load_file(plain / name), load_file(unguided / name)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # Training on the model's own sampler states (--self-input-frac) also changes what is learnt.
    own = train([*args, "--self-input-frac", "1", "--out", str(tmp_path / "own")])
    a, b = load_file(plain / name), load_file(own / name)
    assert any(not torch.equal(a[k], b[k]) for k in a)

    _assert_refused(capsys, (["--guided-loss", "-1"], "--guided-loss must be 0 or more, got -1.0"),
                    (["--guided-loss-max-t", "0"], "--guided-loss-max-t must be between 1 and 1000"),
                    (["--self-input-frac", "1.5"], "--self-input-frac must be between 0 and 1, got 1.5"),
                    (["--self-input-gap", "0"], "--self-input-gap must be between 1 and 999"),
                    (["--sampler-decoder-max-t", "10"], "--sampler-decoder-max-t must be between 49"))


@pytest.mark.parametrize("prediction_type,zero_snr", [("v_prediction", True), ("epsilon", False)])
def test_self_generated_input_of_a_perfect_model_is_the_plain_training_pair(prediction_type, zero_snr):
    """With the true prediction at the earlier timestep, one DDIM step lands exactly on the
    freshly noised latent at the later one, with its usual target: the self-input training
    differs from plain training only by the model's own error."""
    from diffusers import DDPMScheduler

    from tools.train_demo_model import scheduler_config, self_generated_input

    scheduler = DDPMScheduler.from_config(scheduler_config(prediction_type, zero_snr))
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    t, t_before = torch.tensor([0, 400, 900]), torch.tensor([50, 450, 950])

    def pair(at):
        noisy = scheduler.add_noise(x0, noise, at)
        return noisy, (scheduler.get_velocity(x0, noise, at) if prediction_type == "v_prediction" else noise)

    before, true_pred = pair(t_before)
    noisy, target = self_generated_input(scheduler, x0, before, true_pred, t_before, t)
    want_noisy, want_target = pair(t)
    assert torch.allclose(noisy, want_noisy, atol=1e-9) and torch.allclose(target, want_target, atol=1e-9)
    # A wrong prediction moves the state, and the target still leads back to the real x0.
    noisy, target = self_generated_input(scheduler, x0, before, true_pred + 0.3, t_before, t)
    assert not torch.allclose(noisy, want_noisy, atol=1e-3)
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    x0_back = alpha * noisy - sigma * target if prediction_type == "v_prediction" else (noisy - sigma * target) / alpha
    assert torch.allclose(x0_back, x0, atol=1e-9)


def grown_and_inputs(grow):
    """A small UNet, the same UNet grown by ``grow`` (checked to compute exactly the same
    output), and the inputs and output of that check."""
    from tools.train_demo_model import build_unet

    torch.manual_seed(0)
    unet = build_unet(64, 3, 0).eval()
    grown = grow(unet).eval()
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 128, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=text).sample
        assert torch.equal(grown(x, t, encoder_hidden_states=text).sample, before)
    return unet, grown, (x, t, text), before


def test_growing_first_level_attention_keeps_the_function_and_then_trains(tmp_path, capsys):
    """--first-level-attention on --init-from a model without it: the grown UNet computes exactly
    what the old one did, the new attention is live (a nonzero output projection changes the
    output), and growing is the only architecture change --init-from accepts."""
    from tools.train_demo_model import grow_first_level_attention, main as train

    unet, grown, (x, t, text), before = grown_and_inputs(grow_first_level_attention)
    assert grown.config.up_block_types[-1] == "CrossAttnUpBlock2D" and len(grown.up_blocks[-1].attentions) == 2
    with torch.no_grad():
        torch.nn.init.normal_(grown.up_blocks[-1].attentions[0].proj_out.weight, std=0.1)
        assert not torch.allclose(grown(x, t, encoder_hidden_states=text).sample, before)

    vpred = ["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr"]
    first = train([*vpred, "--out", str(tmp_path / "a")])
    second = train([*vpred, "--first-level-attention", "--init-from", str(first), "--out", str(tmp_path / "b")])
    manager = PipelineManager(AppConfig(model=str(second), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    assert manager.pipe.unet.config.up_block_types[-1] == "CrossAttnUpBlock2D"
    image = manager.txt2img(Txt2ImgRequest(prompt="a red circle on a blue background", steps=2, seed=1)).images[0]
    assert np.asarray(image).shape == (64, 64, 3)
    # Taking attention away again is refused, by name.
    with pytest.raises(SystemExit, match="only adding --first-level-attention to a run without it is supported"):
        train([*vpred, "--init-from", str(second), "--out", str(tmp_path / "c")])


def test_text_time_embedding_conditions_every_block_and_loads_through_the_sd_path(tmp_path, capsys):
    """--text-time-embedding: grown onto a UNet without it, the UNet computes exactly what it did
    (the new embedding starts as zero); once its output is nonzero the prompt changes the
    timestep embedding; a run trained with it from scratch loads and samples through the
    Stable Diffusion code path, and continuing it without the flag is refused by name."""
    from tools.train_demo_model import grow_text_time_embedding, main as train

    unet, grown, (x, t, text), before = grown_and_inputs(grow_text_time_embedding)
    assert grown.config.addition_embed_type == "text" and unet.config.addition_embed_type is None
    with torch.no_grad():
        torch.nn.init.ones_(grown.add_embedding.norm2.weight)
        pooled = grown.add_embedding(text)
        assert not torch.allclose(pooled[0], pooled[1])  # two prompts, two different embeddings
        assert not torch.allclose(grown(x, t, encoder_hidden_states=text).sample, before)

    vpred = ["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr"]
    first = train([*vpred, "--text-time-embedding", "--out", str(tmp_path / "a")])
    manager = PipelineManager(AppConfig(model=str(first), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    assert manager.pipe.unet.config.addition_embed_type == "text"
    assert float(manager.pipe.unet.add_embedding.norm2.weight.abs().sum()) > 0
    image = manager.txt2img(Txt2ImgRequest(prompt="a red square on a blue background", steps=2, seed=1)).images[0]
    assert np.asarray(image).shape == (64, 64, 3)
    with pytest.raises(SystemExit, match="pass --text-time-embedding"):
        train([*vpred, "--init-from", str(first), "--out", str(tmp_path / "b")])


def test_sampler_decoder_stage_alone_changes_only_the_decoder(tmp_path, capsys):
    """Stage 3 on an earlier run (--init-from, --unet-steps 0): the UNet, text encoder, encoder
    and latent scale stay exactly as they were, the decoder moves, and the folder still loads."""
    import json

    from safetensors.torch import load_file

    from tools.train_demo_model import main as train, parse_args

    vpred = ["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr"]
    first = train([*vpred, "--out", str(tmp_path / "a")])
    refined = train([*vpred, "--init-from", str(first), "--unet-steps", "0", "--sampler-decoder-steps", "2",
                     "--out", str(tmp_path / "b")])
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(first / name), load_file(refined / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(f / "vae/diffusion_pytorch_model.safetensors") for f in (first, refined))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    scale = [json.loads((f / "vae/config.json").read_text())["scaling_factor"] for f in (first, refined)]
    assert scale[0] == scale[1]
    record = json.loads((refined / "training.json").read_text())
    stats = record["stats"]
    assert stats["sampler_decoder_steps"] == 2 and stats["sampler_decoder_l1"] > 0
    # The refined folder carries the record of the run it refined.
    assert record["init_from_training"] == json.loads((first / "training.json").read_text())
    manager = PipelineManager(AppConfig(model=str(refined), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    assert np.asarray(manager.txt2img(Txt2ImgRequest(prompt="a red circle on a blue background", steps=2,
                                                     seed=1)).images[0]).shape == (64, 64, 3)
    # Stage 3 alone needs an earlier run to refine.
    with pytest.raises(SystemExit):
        parse_args(["--unet-steps", "0"])
    assert "--unet-steps must be positive (0 only with --init-from" in capsys.readouterr().err


def test_caption_matches_takes_a_position_free_caption_as_true_for_any_placement():
    from tools.train_demo_model import caption_matches

    placed = Scene("red", "square", "blue", "top left")
    anywhere = Scene("red", "square", "blue", None)
    captions = [placed, anywhere, Scene("red", "square", "blue", "top right"), Scene("red", "circle", "blue", None),
                Scene("green", "square", "blue", None)]
    got = caption_matches([placed, anywhere], captions)
    assert got.tolist() == [[True, True, False, False, False],
                            [False, True, False, False, False]]


def test_contrastive_text_pretraining_pulls_captions_to_their_images():
    """The CLIP-style stage on a tiny real dataset: 200 scenes of the world reduced to 32x32 (the
    layout of the latents), 200 steps of batch 32. At the start every caption is as likely as any
    other for an image (loss ln 32 = 3.47); the stage must bring the loss well under that, and
    report held-out retrieval accuracies."""
    import math
    import tempfile

    import torch.nn.functional as F
    from transformers import CLIPTokenizer

    from pipelines.tokenizer_files import write_clip_tokenizer
    from tools.demo_world import VOCABULARY, random_scene
    from tools.train_demo_model import build_text_encoder, parse_args, pretrain_text_encoder, to_tensor

    torch.manual_seed(0)
    rng = random.Random(0)
    scenes = [random_scene(rng, position_prob=0.6) for _ in range(200)]
    images = to_tensor([render(s, 64, rng) for s in scenes])
    latents = torch.cat([F.avg_pool2d(images, 2), images.mean(1, keepdim=True)[:, :, ::2, ::2]], dim=1)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, VOCABULARY))
    text_encoder = build_text_encoder(len(tokenizer.get_vocab()), tokenizer.bos_token_id, tokenizer.eos_token_id)
    args = parse_args(["--text-pretrain-steps", "200", "--text-pretrain-batch", "32", "--text-pretrain-lr", "2e-3",
                       "--quiet"])
    args.scaling_factor = float(1 / latents.std())
    stats = pretrain_text_encoder(text_encoder, tokenizer, latents, scenes, args, random.Random(1))
    assert stats["text_pretrain_loss_last50"] < 0.75 * math.log(32), stats
    for attr in ("color", "shape", "background", "position"):
        assert 0.0 <= stats[f"text_pretrain_heldout_{attr}"] <= 1.0


def test_attribute_text_pretraining_reads_every_caption_and_parts_the_shape_words():
    """--text-pretrain-objective attributes: heads on the pooled output learn every caption's
    colours, shape and position. It must read all four back over the world's 1008 captions, and
    it must move the encoder itself: captions that differ only in the shape word end further
    apart (cosine similarity of their pooled outputs) than in the random encoder it started from,
    which is what the UNet needs to draw "square" and "circle" differently."""
    import tempfile

    import torch.nn.functional as F
    from transformers import CLIPTokenizer

    from pipelines.tokenizer_files import write_clip_tokenizer
    from tools.demo_world import VOCABULARY, Scene
    from tools.train_demo_model import build_text_encoder, parse_args, pretrain_text_attributes, world_captions

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, VOCABULARY))
    text_encoder = build_text_encoder(len(tokenizer.get_vocab()), tokenizer.bos_token_id, tokenizer.eos_token_id)
    every = world_captions()
    assert len(every) == len({s.prompt for s in every}) == 8 * 7 * 3 * 6
    squares = [s for s in every if s.shape == "square"]
    circles = [Scene(s.color, "circle", s.background, s.position) for s in squares]

    def shape_word_similarity():
        with torch.no_grad():
            a, b = (text_encoder(tokenizer([s.prompt for s in group], padding="longest", return_tensors="pt")
                                 .input_ids).pooler_output for group in (squares, circles))
        return float(F.cosine_similarity(a, b).mean())

    before = shape_word_similarity()
    args = parse_args(["--text-pretrain-steps", "150", "--text-pretrain-batch", "64", "--text-pretrain-lr", "2e-3",
                       "--text-pretrain-objective", "attributes", "--quiet"])
    stats = pretrain_text_attributes(text_encoder, tokenizer, args)
    for attr in ("color", "shape", "background", "position"):
        assert stats[f"text_pretrain_world_{attr}"] >= 0.99, stats
    after = shape_word_similarity()
    assert after < before - 0.1, (before, after)  # measured: 0.965 -> 0.784


def test_training_script_runs_the_attribute_objective_it_is_given(tmp_path):
    """The command line reaches the objective: a --smoke run with --text-pretrain-objective
    attributes records the attribute read-back and not the contrastive retrieval."""
    import json

    from tools.train_demo_model import main as train

    out = train(["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr",
                 "--freeze-text-encoder", "--text-pretrain-steps", "2", "--text-pretrain-objective", "attributes",
                 "--out", str(tmp_path / "attr")])
    stats = json.loads((out / "training.json").read_text())["stats"]
    assert {f"text_pretrain_world_{a}" for a in ("color", "shape", "background", "position")} <= set(stats), stats
    assert not any(k.startswith("text_pretrain_heldout_") for k in stats), stats


def test_pretrained_text_encoder_stays_frozen_and_bf16_runs_save_float32(tmp_path, capsys):
    """--text-pretrain-steps changes the text encoder before stage 2, --freeze-text-encoder keeps it
    exactly through stage 2 (every checkpoint of --checkpoint-every holds the same one), --bf16
    still writes float32 weights, and each checkpoint loads through the studio's loader."""
    import json

    from safetensors.torch import load_file

    from tools.train_demo_model import main as train, parse_args

    base = ["--smoke", "--quiet", "--bf16", "--prediction-type", "v_prediction", "--zero-terminal-snr",
            "--freeze-text-encoder", "--checkpoint-every", "1"]
    frozen = train([*base, "--text-pretrain-steps", "2", "--out", str(tmp_path / "frozen")])
    untouched = train([*base, "--out", str(tmp_path / "untouched")])
    joint = train(["--smoke", "--quiet", "--bf16", "--prediction-type", "v_prediction", "--zero-terminal-snr",
                   "--checkpoint-every", "1", "--out", str(tmp_path / "joint")])
    name = "text_encoder/model.safetensors"
    final = load_file(frozen / name)
    assert {str(v.dtype) for v in final.values()} == {"torch.float32"}
    assert {str(v.dtype) for v in load_file(frozen / "unet/diffusion_pytorch_model.safetensors").values()} == {
        "torch.float32"}
    checkpoints = sorted((frozen / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-1", "step-2"]
    for checkpoint in checkpoints:
        saved = load_file(checkpoint / name)
        assert all(torch.equal(saved[k], final[k]) for k in final)
    # Pretraining moved the encoder away from its random start (the untouched run kept that start) ...
    start = load_file(untouched / name)
    assert any(not torch.equal(start[k], final[k]) for k in final)
    # ... and without --freeze-text-encoder stage 2 trains it.
    trained = load_file(joint / name)
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    stats = json.loads((frozen / "training.json").read_text())["stats"]
    assert {"text_pretrain_heldout_shape", "text_pretrain_loss_last50"} <= set(stats)
    manager = PipelineManager(AppConfig(model=str(checkpoints[0]), output_dir=tmp_path / "o", device="cpu",
                                        safety_checker=False))
    image = manager.txt2img(Txt2ImgRequest(prompt="a red circle on a blue background", steps=2, seed=1)).images[0]
    assert np.asarray(image).shape == (64, 64, 3)

    for bad, message in ((["--guided-loss-from", "1"], "--guided-loss-from must be a fraction of the UNet steps in [0, 1), got 1.0"),
                         (["--text-pretrain-steps", "-1"], "--text-pretrain-steps must be 0 or more, got -1"),
                         (["--checkpoint-every", "-5"], "--checkpoint-every must be 0 or more, got -5"),
                         (["--text-pretrain-batch", "1"],
                          "--text-pretrain-batch must be at least 2 for --text-pretrain-objective contrastive, got 1"),
                         (["--text-pretrain-batch", "0", "--text-pretrain-objective", "attributes"],
                          "--text-pretrain-batch must be at least 1 for --text-pretrain-objective attributes, got 0"),
                         (["--lowres-steps", "10", "--lowres-size", "96"],
                          "--lowres-size must be a multiple of 64 below --size 256, got 96"),
                         (["--lowres-steps", "-1"], "--lowres-steps must be 0 or more, got -1")):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert message in capsys.readouterr().err
    # Only the contrastive loss needs two captions a batch; the attribute heads read one.
    assert parse_args(["--text-pretrain-batch", "1", "--text-pretrain-objective", "attributes"]).text_pretrain_batch == 1


def test_guided_loss_from_starts_the_term_partway_through_stage_2(tmp_path):
    import json

    from tools.train_demo_model import main as train

    args = ["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr",
            "--guided-loss", "1", "--guided-loss-max-t", "1000"]
    counts = {}
    for start in ("0", "0.5"):
        out = train([*args, "--guided-loss-from", start, "--out", str(tmp_path / start)])
        counts[start] = json.loads((out / "training.json").read_text())["stats"]["guided_loss_steps"]
    assert counts == {"0": 3, "0.5": 2}  # the smoke run's 3 UNet steps; from 0.5: steps 1 and 2


def test_lowres_stage_trains_the_unet_on_smaller_images_first(tmp_path):
    """--lowres-steps: stage 2a encodes its own smaller images and trains the same UNet on them
    before the native-size stage; the result differs from the run without it and loads."""
    import json

    from safetensors.torch import load_file

    from tools.train_demo_model import main as train

    args = ["--smoke", "--quiet", "--bf16", "--prediction-type", "v_prediction", "--zero-terminal-snr"]
    plain = train([*args, "--out", str(tmp_path / "plain")])
    staged = train([*args, "--lowres-steps", "2", "--dataset-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "staged")])
    stats = json.loads((staged / "training.json").read_text())["stats"]
    assert stats["lowres_diffusion_loss_last100"] > 0 and "lowres_diffusion_loss_last100" not in json.loads(
        (plain / "training.json").read_text())["stats"]
    # Two encoded sets in the cache: the native-size one and stage 2a's (another image size).
    sizes = sorted(torch.load(f, weights_only=False)["latents"].shape[-1] for f in (tmp_path / "cache").glob("latents-*.pt"))
    assert sizes == [4, 8]  # smoke: 32 px and 64 px images, f=8
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(plain / name), load_file(staged / name)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    manager = PipelineManager(AppConfig(model=str(staged), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    assert manager.native_size == 64


def test_edge_weights_favour_the_outline_and_change_what_is_learnt(tmp_path, capsys):
    """--edge-weight: the loss weight peaks on the clean latent's outline (corners included),
    keeps a mean of 1 per sample, is uniform on a flat latent, changes a smoke run's weights,
    and a negative value is refused by name."""
    from safetensors.torch import load_file

    from tools.train_demo_model import edge_weights, main as train, parse_args

    x0 = torch.zeros(2, 4, 16, 16)
    x0[0, :, 4:10, 4:10] = 1.0  # a square; the second sample stays flat
    w = edge_weights(x0, 4.0)
    assert w.shape == (2, 1, 16, 16)
    assert torch.allclose(w.mean(dim=(2, 3)), torch.ones(2, 1))
    assert torch.equal(w[1], torch.ones(1, 16, 16))
    square = w[0, 0]
    assert square[4, 4] > 3 * square[0, 0]  # a corner against the far background
    assert square[4, 4] > 3 * square[7, 7]  # and against the object's flat middle
    assert torch.equal(edge_weights(x0, 0.0), torch.ones(2, 1, 16, 16))

    args = ["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr"]
    plain = train([*args, "--out", str(tmp_path / "plain")])
    edged = train([*args, "--edge-weight", "4", "--out", str(tmp_path / "edged")])
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(plain / name), load_file(edged / name)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):
        parse_args(["--edge-weight", "-1"])
    assert "--edge-weight must be a number >= 0, got -1.0" in capsys.readouterr().err


def test_second_cycle_starts_from_stage_two_and_trains_on_fresh_scenes(tmp_path, capsys):
    """--second-cycle-steps (stage 2b) goes on from exactly the weights stage 2 ends on, on
    scenes stage 2 never saw, and moves the weights; stage 2's end is kept as a checkpoint;
    bad values are refused by name."""
    from safetensors.torch import load_file

    from tools.train_demo_model import main as train, parse_args

    args = ["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr"]
    plain = train([*args, "--out", str(tmp_path / "plain")])
    cycled = train([*args, "--second-cycle-steps", "2", "--checkpoint-every", "2",
                    "--dataset-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "cycled")])
    name = "unet/diffusion_pytorch_model.safetensors"
    stage2_end = load_file(cycled / "checkpoints" / "step-3" / name)  # --smoke runs stage 2 for 3 steps
    without, final = load_file(plain / name), load_file(cycled / name)
    assert all(torch.equal(stage2_end[k], without[k]) for k in without)
    assert any(not torch.equal(final[k], without[k]) for k in without)
    stats = json.loads((cycled / "training.json").read_text())["stats"]
    assert stats["second_cycle_diffusion_loss_last100"] > 0
    # Two encoded sets in the cache: stage 2's 16 scenes and stage 2b's 8 new ones.
    sets = sorted((torch.load(f, weights_only=False) for f in (tmp_path / "cache").glob("latents-*.pt")),
                  key=lambda saved: len(saved["scenes"]))
    assert [len(s["scenes"]) for s in sets] == [8, 16]
    assert sets[0]["scenes"] != sets[1]["scenes"][:8]
    assert not any(torch.equal(a, b) for a in sets[0]["latents"] for b in sets[1]["latents"])

    for bad, message in ((["--second-cycle-steps", "-1"], "--second-cycle-steps must be 0 or more, got -1"),
                         (["--second-cycle-steps", "10", "--second-cycle-lr", "0"],
                          "--second-cycle-lr must be a positive number, got 0.0"),
                         (["--second-cycle-steps", "10", "--second-cycle-dataset", "0"],
                          "--second-cycle-dataset must be at least 1 image, got 0")):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert message in capsys.readouterr().err


def test_second_cycles_repeat_from_each_others_end_on_their_own_scenes(tmp_path, capsys):
    """--second-cycles 2 runs stage 2b twice: the first cycle is exactly the one a single-cycle
    run trains (its end is kept as a checkpoint), the second goes on from it on scenes neither
    earlier stage saw, and moves the weights; 0 cycles is refused by name."""
    from safetensors.torch import load_file

    from tools.train_demo_model import main as train, parse_args

    args = ["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr",
            "--second-cycle-steps", "2", "--checkpoint-every", "2"]
    one = train([*args, "--out", str(tmp_path / "one")])
    two = train([*args, "--second-cycles", "2", "--dataset-cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "two")])
    name = "unet/diffusion_pytorch_model.safetensors"
    # --smoke: stage 2 runs 3 steps (a checkpoint at 2) and each cycle 2; a checkpoint where each
    # cycle starts.
    assert sorted(d.name for d in (two / "checkpoints").iterdir()) == ["step-2", "step-3", "step-5"]
    first_end, single = load_file(two / "checkpoints" / "step-5" / name), load_file(one / name)
    assert all(torch.equal(first_end[k], single[k]) for k in single)
    final = load_file(two / name)
    assert any(not torch.equal(final[k], single[k]) for k in single)
    stats = json.loads((two / "training.json").read_text())["stats"]
    assert stats["second_cycle_diffusion_loss_last100"] > 0
    assert stats["second_cycle_2_diffusion_loss_last100"] > 0
    sets = [torch.load(f, weights_only=False)["scenes"] for f in (tmp_path / "cache").glob("latents-*.pt")]
    assert sorted(len(s) for s in sets) == [8, 8, 16]
    first_cycle, second_cycle = (s for s in sets if len(s) == 8)
    assert first_cycle != second_cycle

    with pytest.raises(SystemExit):
        parse_args(["--second-cycle-steps", "10", "--second-cycles", "0"])
    assert "--second-cycles must be at least 1 (use --second-cycle-steps 0 for none), got 0" in capsys.readouterr().err


def _assert_refused(capsys, *cases) -> None:
    """Each (argv, message): the training script refuses argv, and its error names the option and value."""
    from tools.train_demo_model import parse_args

    for bad, message in cases:
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert message in capsys.readouterr().err, bad


def _object_pixels(image: np.ndarray, background: str) -> np.ndarray:
    return np.abs(image.astype(int) - np.array(COLORS[background])).sum(axis=-1) > 60


def test_superellipse_runs_from_the_disc_to_the_square_in_the_same_box():
    """render_box's exponent: 2 draws the scene's disc, a large one its square, the values
    between fill the box more the larger they are, and the grader reads the ends correctly."""
    from tools.demo_world import render_box

    scene = Scene("red", "circle", "blue", None)
    disc = render_box(scene, 256, 0.4, 0.5, 0.5)
    assert np.abs(render_box(scene, 256, 0.4, 0.5, 0.5, exponent=2.0).astype(int) - disc).mean() < 0.05
    square = render_box(Scene("red", "square", "blue", None), 256, 0.4, 0.5, 0.5)
    assert np.abs(render_box(scene, 256, 0.4, 0.5, 0.5, exponent=200.0).astype(int) - square).mean() < 0.5
    fills = [_object_pixels(render_box(scene, 256, 0.4, 0.5, 0.5, exponent=n), "blue").sum() for n in (1.6, 2, 3, 5, 8)]
    assert fills == sorted(fills) and len(set(fills)) == 5
    assert analyze(render_box(scene, 256, 0.4, 0.5, 0.5, exponent=2.0)).shape == "circle"
    assert analyze(render_box(scene, 256, 0.4, 0.5, 0.5, exponent=200.0)).shape == "square"
    with pytest.raises(ValueError, match="exponent"):
        render_box(scene, 256, 0.4, 0.5, 0.5, exponent=0.0)


def _blended_subpixels(scene, size, extent, cx, cy, supersample=2, exponent=None):
    """render_box as first written: every subpixel coloured fg or bg, then averaged."""
    half, n = extent / 2, size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    x, y = coords[None, :], coords[:, None]
    if exponent is not None:
        with np.errstate(over="ignore"):
            mask = (np.abs(x - cx) / half) ** exponent + (np.abs(y - cy) / half) ** exponent <= 1
    elif scene.shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif scene.shape == "square":
        mask = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:
        depth = (y - (cy - half)) / extent
        mask = (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= depth * half)
    img = np.where(mask[..., None], np.array(COLORS[scene.color], np.float32),
                   np.array(COLORS[scene.background], np.float32))
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def test_render_box_is_bit_for_bit_the_subpixel_average_and_its_window_the_crop():
    """The coverage blend gives exactly the pixels of averaging blended subpixels (so data drawn
    before the change is the data drawn now), and a window gives exactly the crop of the full
    image, for every shape, superellipses, sizes and supersampling factors."""
    from tools.demo_world import object_box, random_scene, render_box

    rng = random.Random(3)
    for _ in range(60):
        scene = random_scene(rng)
        box = object_box(scene, rng)
        size, ss, exponent = rng.choice([128, 256]), rng.choice([2, 3, 4]), rng.choice([None, None, 1.8, 3.0])
        full = render_box(scene, size, *box, supersample=ss, exponent=exponent)
        assert np.array_equal(full, _blended_subpixels(scene, size, *box, supersample=ss, exponent=exponent))
        top, left = rng.randrange(size - 96 + 1), rng.randrange(size - 96 + 1)
        part = render_box(scene, size, *box, supersample=ss, exponent=exponent, window=(top, left, 96, 40))
        assert np.array_equal(part, full[top : top + 96, left : left + 40])
    for bad in [(-1, 0, 96, 96), (200, 0, 96, 96), (0, 0, 0, 96), (0, 250, 10, 10)]:
        with pytest.raises(ValueError, match=r"window: .* is not inside a 256 x 256 image"):
            render_box(Scene("red", "square", "blue", None), 256, 0.4, 0.5, 0.5, window=bad)


def test_vae_stage_crops_are_the_crops_of_the_full_images_it_used_to_draw(monkeypatch):
    """train_vae draws only the crop; its random draws and pixels are those of rendering the
    whole image and then cropping it, so a seed gives the same VAE training data as before."""
    import tools.train_demo_model as tdm

    class Drawn(Exception):
        pass

    def capture(images):
        raise Drawn(images)

    monkeypatch.setattr(tdm, "to_tensor", capture)
    for grid in ("0", "8"):
        args = tdm.parse_args(["--vae-steps", "1", "--vae-batch", "6", "--object-grid", grid, "--quiet"])
        with pytest.raises(Drawn) as drawn:
            tdm.train_vae(tdm.build_vae(256), args, random.Random(11))
        old_rng = random.Random(11)
        expected = []
        for _ in range(6):
            full = render(random_scene(old_rng), 256, old_rng, grid=int(grid))
            y, x = old_rng.randrange(256 - 96 + 1), old_rng.randrange(256 - 96 + 1)
            expected.append(full[y : y + 96, x : x + 96])
        got = drawn.value.args[0]
        assert len(got) == 6 and all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_outline_stage_alone_trains_only_the_unet_reproducibly_and_refuses_bad_options(tmp_path, capsys):
    """Stage 4 on an earlier run (--init-from, --unet-steps 0): the UNet moves, exactly the same
    way twice; the VAE and the text encoder stay as they were; the folder loads and draws."""
    import json

    from safetensors.torch import load_file

    from tools.train_demo_model import main as train

    vpred = ["--smoke", "--quiet", "--prediction-type", "v_prediction", "--zero-terminal-snr"]
    first = train([*vpred, "--out", str(tmp_path / "a")])
    stage4 = [*vpred, "--init-from", str(first), "--unet-steps", "0", "--outline-steps", "2"]
    outs = [train([*stage4, "--out", str(tmp_path / name)]) for name in ("b", "c")]
    unets = [load_file(f / "unet/diffusion_pytorch_model.safetensors") for f in (first, *outs)]
    assert any(not torch.equal(unets[0][k], unets[1][k]) for k in unets[0])
    assert all(torch.equal(unets[1][k], unets[2][k]) for k in unets[1])
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(first / name), load_file(outs[0] / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    stats = json.loads((outs[0] / "training.json").read_text())["stats"]
    assert stats["outline_steps"] == 2 and stats["outline_pair_loss_last50"] > 0 and stats["outline_plain_loss_last50"] > 0
    manager = PipelineManager(AppConfig(model=str(outs[0]), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    assert np.asarray(manager.txt2img(Txt2ImgRequest(prompt="a red square on a blue background", steps=2,
                                                     seed=1)).images[0]).shape == (64, 64, 3)
    _assert_refused(capsys, (["--outline-t", "600,100"], "--outline-t must satisfy 0 <= MIN <= MAX <= 999, got '600,100'"),
                    (["--outline-t", "150"], "--outline-t must be MIN,MAX"),
                    (["--outline-exponents", "hexagon:2:3"], "'hexagon' is not one of circle, square, triangle"),
                    (["--outline-exponents", "square:8:2.4"], "square needs 0 < LO <= HI, got 8:2.4"),
                    (["--outline-exponents", "square-2-8"], "SHAPE:LO:HI entries"),
                    (["--outline-lr", "0"], "--outline-lr must be a positive number, got 0.0"),
                    (["--outline-ema", "1"], "--outline-ema must be in [0, 1), got 1.0"),
                    (["--outline-weight", "-1"], "--outline-weight must be a positive number, got -1.0"))
