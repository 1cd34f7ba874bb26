//! The chunked log-prob op equals the naive log_softmax + gather path, in values, entropies and
//! gradients, for chunk sizes that do and do not divide the token and vocabulary counts.

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use grail_kernels::{
    ChunkSizes, gradient_surrogate, naive_selective_logprobs, selective_logprobs_backward,
    selective_logprobs_forward,
};
use grail_testkit::rel;

fn inputs(
    n: usize,
    h: usize,
    v: usize,
    device: &Device,
) -> (Tensor<2>, Tensor<2>, Tensor<1, Int>, Tensor<1>) {
    let hidden = Tensor::<2>::random([n, h], Distribution::Normal(0.0, 1.0), device);
    let weight = Tensor::<2>::random([v, h], Distribution::Normal(0.0, 0.3), device);
    let targets: Vec<i64> = (0..n).map(|i| ((i * 7919 + 13) % v) as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), device);
    let g = Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), device);
    (hidden, weight, targets, g)
}

#[test]
fn fused_matches_naive_values_entropy_and_gradients() {
    let device = Device::flex();
    for (n, h, v, temperature) in [(37, 16, 101, 1.0), (64, 24, 333, 0.7), (1, 8, 50, 1.3)] {
        let (hidden, weight, targets, g) = inputs(n, h, v, &device);
        // Naive reference under autodiff.
        let h_ad = hidden.clone().autodiff().require_grad();
        let w_ad = weight.clone().autodiff().require_grad();
        let naive = naive_selective_logprobs(
            h_ad.clone(),
            w_ad.clone(),
            targets.clone().autodiff(),
            temperature,
        );
        let grads = (naive.clone() * g.clone().autodiff()).sum().backward();
        let naive_gh = h_ad.grad(&grads).unwrap();
        let naive_gw = w_ad.grad(&grads).unwrap();
        let naive = naive.without_autodiff();
        let logits = hidden.clone().matmul(weight.clone().transpose()) / temperature;
        let p = burn::tensor::activation::softmax(logits.clone(), 1);
        let naive_entropy = (p.clone() * burn::tensor::activation::log_softmax(logits, 1))
            .sum_dim(1)
            .neg();

        for chunks in [
            ChunkSizes {
                tokens: 1,
                vocab: 7,
            },
            ChunkSizes {
                tokens: 5,
                vocab: 64,
            },
            ChunkSizes {
                tokens: 16,
                vocab: 1000,
            },
            ChunkSizes::default(),
        ]
        .into_iter()
        .flat_map(|c| [(c, true), (c, false)])
        {
            // Plain Flex tensors run the CPU kernel; autodiff-device tensors run the generic
            // tile-by-tile tensor ops (the path other backends take): both must match.
            let (chunks, kernel) = chunks;
            let on = |t: &Tensor<2>| {
                if kernel {
                    t.clone()
                } else {
                    t.clone().autodiff()
                }
            };
            let (hidden, weight) = (on(&hidden), on(&weight));
            let targets = if kernel {
                targets.clone()
            } else {
                targets.clone().autodiff()
            };
            let g = if kernel {
                g.clone()
            } else {
                g.clone().autodiff()
            };
            let out =
                selective_logprobs_forward(&hidden, &weight, &targets, temperature, chunks, true);
            let what = format!("n={n} v={v} T={temperature} {chunks:?} kernel={kernel}");
            let e = rel(out.logp.clone(), naive.clone());
            assert!(e < 1e-5, "{what}: logp rel err {e:e}");
            let e = rel(
                out.entropy.clone().unwrap(),
                naive_entropy.clone().reshape([n]),
            );
            assert!(e < 1e-5, "{what}: entropy rel err {e:e}");
            let (gh, gw) = selective_logprobs_backward(
                &hidden,
                &weight,
                &targets,
                &out.lse,
                &g,
                temperature,
                chunks,
            );
            let e = rel(gh.clone(), naive_gh.clone());
            assert!(e < 1e-5, "{what}: grad hidden rel err {e:e}");
            let e = rel(gw.clone(), naive_gw.clone());
            assert!(e < 1e-5, "{what}: grad weight rel err {e:e}");
        }
    }
}

#[test]
fn surrogate_delivers_the_fused_gradients_through_autodiff() {
    let device = Device::flex();
    let (hidden, weight, targets, g) = inputs(20, 12, 90, &device);
    // hidden = x · A, so the gradient must flow on into A.
    let a = Tensor::<2>::random([12, 12], Distribution::Normal(0.0, 0.5), &device)
        .autodiff()
        .require_grad();
    let w_ad = weight.clone().autodiff().require_grad();
    let h_ad = hidden.clone().autodiff().matmul(a.clone());
    let chunks = ChunkSizes {
        tokens: 6,
        vocab: 32,
    };
    let h_plain = h_ad.clone().without_autodiff();
    let out = selective_logprobs_forward(&h_plain, &weight, &targets, 1.0, chunks, false);
    let (gh, gw) =
        selective_logprobs_backward(&h_plain, &weight, &targets, &out.lse, &g, 1.0, chunks);
    let grads = gradient_surrogate(h_ad, w_ad.clone(), gh, gw).backward();

    let a2 = a.clone().without_autodiff().autodiff().require_grad();
    let w2 = weight.autodiff().require_grad();
    let naive = naive_selective_logprobs(
        hidden.autodiff().matmul(a2.clone()),
        w2.clone(),
        targets.autodiff(),
        1.0,
    );
    let grads2 = (naive * g.autodiff()).sum().backward();
    assert!(rel(a.grad(&grads).unwrap(), a2.grad(&grads2).unwrap()) < 1e-5);
    assert!(rel(w_ad.grad(&grads).unwrap(), w2.grad(&grads2).unwrap()) < 1e-5);
}
