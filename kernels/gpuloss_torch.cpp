// cce_with_logits with class indices on torch CPU tensors as a PyTorch operator whose autograd
// node is C++: the call a training loop makes, without the Python of a torch.autograd.Function
// (about 30 us a call, forward and backward). Built on first use by gpuloss/_torch_build.py
// against the installed torch; gpuloss._torch takes it for the calls it can, and its Python
// node (_EagerFn) for the rest.
//
// gpuloss_host::cce_labels(pred, labels, ignore_index, validate, mean, threads, openmp) -> value
// (the namespace gpuloss holds the losses' custom operators for torch.compile, gpuloss._torch):
// the same row pass as the CPython extension (gpuloss_host.cpp, compiled in here), value and
// gradient in one pass; the value (the mean or the sum, a 0-dim tensor of pred's dtype) comes
// back with a node that keeps the gradient, as _EagerFn does: backward hands it over without
// a copy (kept with retain_graph), refuses create_graph, a second backward, and a kept
// gradient changed in place. An undefined result (None in Python) where the pass declined:
// a label out of range, no memory for its scratch; the NumPy backend then raises or computes.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scalar_tensor.h>

#include <cmath>

#include "gpuloss_host.cpp"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The messages of gpuloss._torch (NO_SECOND_DERIVATIVE, FREED, CHANGED), word for word
const char* const NO_SECOND_DERIVATIVE =
    "gpuloss losses have no second derivative: backward computes the fused gradient, which is "
    "not itself differentiable (create_graph=True, torch.func.hessian, grad of grad). Use the "
    "loss's PyTorch formula where second derivatives are needed.";
const char* const FREED =
    "Trying to backward through a gpuloss loss a second time: its gradient was freed by the "
    "first backward. Pass retain_graph=True to the first one.";
const char* const CHANGED =
    "one of the variables needed for gradient computation has been modified by an inplace "
    "operation: the gradient a gpuloss loss keeps for backward (returned by an earlier "
    "backward with retain_graph=True, or passed to a hook) was changed in place. Clone it "
    "before changing it.";

struct KeptGradient : public torch::autograd::Function<KeptGradient> {
    // (value, grad) computed before; grad kept as data, not saved: backward hands the tensor
    // itself to autograd, which takes it as pred.grad without a copy only if nothing else
    // holds it
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pred, at::Tensor value,
                              at::Tensor grad) {
        (void)pred;  // (the input the gradient is for)
        ctx->saved_data["version"] = (int64_t)grad._version();
        ctx->saved_data["grad"] = std::move(grad);
        return value;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
        TORCH_CHECK(!at::GradMode::is_enabled(), NO_SECOND_DERIVATIVE);  // create_graph=True
        c10::IValue& kept = ctx->saved_data["grad"];
        TORCH_CHECK(kept.isTensor(), FREED);
        at::Tensor grad = kept.toTensor();
        TORCH_CHECK(grad._version() == ctx->saved_data["version"].toInt(), CHANGED);
        if (!torch::autograd::get_current_graph_task_keep_graph()) kept = c10::IValue();
        const at::Tensor& go = grad_outputs[0];
        if (!(go.dim() == 0 && go.device().is_cpu() && go.item<double>() == 1.0))
            grad = at::mul(grad, go);  // (loss.backward() passes 1: the gradient itself)
        return {grad, at::Tensor(), at::Tensor()};
    }
};

// gpuloss.backends.host (compute_torch_graph) calls it with the arguments checked (the labels'
// shape too); the checks here keep a direct call from reading out of bounds.
at::Tensor cce_labels_op(const at::Tensor& pred, const at::Tensor& labels,
                         c10::optional<int64_t> ignore_index, bool validate, bool mean,
                         int64_t threads, int64_t openmp) {
    TORCH_CHECK(pred.device().is_cpu() && labels.device().is_cpu(), "CPU tensors only");
    TORCH_CHECK(pred.scalar_type() == at::kFloat || pred.scalar_type() == at::kDouble,
                "pred must be float32 or float64");
    TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                "labels must be int64 or int32");
    TORCH_CHECK(pred.dim() >= 1 && pred.size(-1) >= 1 && pred.size(-1) < (1LL << 31) &&
                    pred.numel() >= 1, "pred needs classes along its last axis");
    TORCH_CHECK(pred.is_contiguous() && labels.is_contiguous() && !pred.is_neg() &&
                    !labels.is_neg(), "contiguous tensors only");
    long long K = pred.size(-1), R = pred.numel() / K;
    TORCH_CHECK(labels.numel() == R, "one label per row of pred");
    TORCH_CHECK(threads >= 1, "threads >= 1");
    bool f64 = pred.scalar_type() == at::kDouble, l32 = labels.scalar_type() == at::kInt;
    at::Tensor grad = at::empty(pred.sizes(), pred.options().requires_grad(false));
    double total = 0.0, denom = 0.0;
    bool has_ignore = ignore_index.has_value();
    long long ignore = has_ignore ? *ignore_index : 0;
    int flags = cce_labels_any(f64, l32, pred.data_ptr(), labels.data_ptr(), R, K, has_ignore,
                               ignore, validate, mean, grad.data_ptr(), nullptr, true,
                               (int)threads, openmp != 0, &total, &denom);
    if (flags) return at::Tensor();  // the NumPy backend raises its error, or computes
    // the mean formed in float64 and rounded once to pred's dtype (NaN where nothing counted)
    double v = mean ? (denom != 0.0 ? total / denom : NAN) : total;
    at::Tensor value = at::scalar_tensor(v, pred.options().requires_grad(false));
    return KeptGradient::apply(pred, value, grad);
}

// This library's copy of the pool takes its own fork handler (the CPython module's is
// registered by its PyInit, which does not run here)
const int registered_at_fork = pthread_atfork(nullptr, nullptr, at_fork_child);

}  // namespace

TORCH_LIBRARY(gpuloss_host, m) {
    m.def("cce_labels(Tensor pred, Tensor labels, int? ignore_index, bool validate, bool mean, "
          "int threads, int openmp) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpuloss_host, CompositeImplicitAutograd, m) {
    m.impl("cce_labels", cce_labels_op);
}
