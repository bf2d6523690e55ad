"""GPU paths (skipped without CUDA): bit-exact casts and NVFP4 bytes on the device, and Model Optimizer's
own NVFP4 W4A4 forward, which needs CUDA, against labs_lib's emulation on the same model."""

import pytest
import torch

from labs_lib.blockquant import NVFP4
from labs_lib.formats import cast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "bf16", "fp16", "e8m0"])
def test_cast_on_gpu_equals_cpu(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g) * torch.exp2(torch.randint(-20, 20, (1_000_000,), generator=g).float())
    if name == "e8m0":
        x = x.abs() + 1e-30
    cpu, gpu = cast(x, name), cast(x.cuda(), name).cpu()
    assert torch.equal(torch.isnan(cpu), torch.isnan(gpu))
    assert torch.equal(cpu.nan_to_num(), gpu.nan_to_num())


def test_nvfp4_bytes_on_gpu_equal_model_optimizer_on_gpu():
    """On CUDA, `tensor / python_number` multiplies by the reciprocal, so the FP32 tensor scale can differ
    from the CPU's by one ulp; what must hold is agreement with Model Optimizer on the same device."""
    qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    for seed in range(5):
        w = (torch.randn(576, 1536, generator=torch.Generator().manual_seed(seed)) * 0.02).bfloat16().cuda()
        ours = NVFP4().quantize(w)
        packed, scale, scale_2 = qtensor.NVFP4QTensor.quantize(w.clone(), 16)
        assert torch.equal(ours["weight"], packed._quantized_data)
        assert torch.equal(ours["weight_scale"].view(torch.uint8), scale.view(torch.uint8))
        assert torch.equal(ours["weight_scale_2"], scale_2)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_model_optimizer_w4a4_forward_matches_labs_lib_emulation():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from labs_lib.fake_quant import calibrate_input_amax, fake_quantized_copy

    model = tiny_llama().cuda()
    calib = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1)).cuda()
    probe = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(2)).cuda()
    amax = calibrate_input_amax(model, calib)
    ours = fake_quantized_copy(model, NVFP4(), NVFP4(), amax)
    import copy

    theirs = copy.deepcopy(model)
    mtq.quantize(theirs, mtq.NVFP4_DEFAULT_CFG, lambda m: [m(b[None]) for b in calib])
    with torch.inference_mode():
        ref, a, b = model(probe).logits, ours(probe).logits, theirs(probe).logits
    quant_effect = (b - ref).norm() / ref.norm()
    disagreement = (a - b).norm() / ref.norm()
    print(f"quantization changes logits by {quant_effect:.4f}; labs_lib vs Model Optimizer differ by "
          f"{disagreement:.2e}")
    assert quant_effect > 1e-3  # the quantizers are really on
    assert disagreement < 0.01 * quant_effect


@pytest.mark.parametrize("method", ["GPTQ", "AWQ"])
def test_gptq_and_awq_on_cuda_match_the_cpu(method):
    """The same calibration data on a small random Llama: the GPU result equals the CPU's up to a few
    codes that float rounding order moves across a rounding boundary."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from labs_lib.awq import AWQ
    from labs_lib.blockquant import IntGroup
    from labs_lib.gptq import GPTQ

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    batches = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    make = {"GPTQ": GPTQ, "AWQ": AWQ}[method]
    cpu, gpu = copy.deepcopy(model), copy.deepcopy(model).cuda()
    codes_cpu = make(IntGroup(4, 64, symmetric=False)).quantize_model(cpu, batches)
    codes_gpu = make(IntGroup(4, 64, symmetric=False)).quantize_model(gpu, batches)
    for name, q in codes_cpu.items():
        differ = (q["codes"] != codes_gpu[name]["codes"].cpu()).float().mean().item()
        assert differ < 0.02, (name, differ)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 tensor cores")
def test_fp8_linear_on_fp8_tensor_cores_matches_the_cpu_emulation():
    from labs_lib.fp8 import FP8Linear, ScalingRecipe, quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 100
    for fmt in ("fp8_e4m3", "fp8_e5m2"):  # native cast == formats.cast, saturation included
        native = quantize(x.cuda(), fmt, torch.tensor(3.0).cuda()).float().cpu()
        assert torch.equal(native, quantize(x, fmt, torch.tensor(3.0)))
    linear = torch.nn.Linear(256, 128)
    inp = torch.randn(64, 256, generator=g)
    grad = torch.randn(64, 128, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        layer = FP8Linear.from_linear(torch.nn.Linear(256, 128).to(device), ScalingRecipe())
        layer.load_state_dict(linear.state_dict())
        x_dev = inp.to(device).detach().requires_grad_(True)
        y = layer(x_dev)
        y.backward(grad.to(device))
        results.append([t.detach().cpu() for t in (y, x_dev.grad, layer.weight.grad)])
    # same FP8 operands on both sides; Hopper's FP8 tensor cores accumulate with fewer bits than float32
    # (measured on an H100: relative differences of order 1e-4 to 1e-3), so this is close, not equal
    for name, cpu, gpu in zip(("output", "input grad", "weight grad"), *results):
        rel = ((gpu - cpu).norm() / cpu.norm()).item()
        print(f"{name}: relative difference GPU vs CPU emulation {rel:.2e}")
        assert rel < 2e-3
