//! An identity op that is a yield point (see [`crate::pressure`]) in the forward pass and again, in
//! reverse, in the backward pass, so training steps aside for serving between candle's own ops too.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::pressure;

struct YieldPoint;

impl CustomOp1 for YieldPoint {
    fn name(&self) -> &'static str {
        "yield-point"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        pressure::yield_point();
        let copy = crate::model::linear::f32_slice(storage, layout, "yield-point input")?.to_vec();
        Ok((CpuStorage::F32(copy), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        pressure::yield_point();
        Ok(Some(grad_res.clone()))
    }
}

/// `x` itself, through a yield point in both passes when the calling thread yields to serving (the
/// trainer's threads) and `x` is a CPU f32 tensor; otherwise `x` untouched, at no cost.
pub fn yield_here(x: &Tensor) -> candle_core::Result<Tensor> {
    if !pressure::yields_on_this_thread()
        || !x.device().is_cpu()
        || x.dtype() != candle_core::DType::F32
    {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1(YieldPoint)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use candle_core::{Device, Tensor, Var};

    use super::yield_here;
    use crate::pressure::{yield_on_this_thread, ServingPressure};

    #[test]
    fn a_yield_point_is_the_identity_in_both_passes_and_waits_in_both() {
        let x = Var::from_tensor(&Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(
            yield_here(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            x.as_tensor().to_vec1::<f32>().unwrap(),
        );
        let pressure = ServingPressure::new();
        let pending = pressure.begin();
        yield_on_this_thread(Some((pressure.clone(), Duration::from_millis(20))));
        let y = yield_here(x.as_tensor()).unwrap();
        let after_forward = pressure.yielded();
        assert!(
            after_forward >= Duration::from_millis(15),
            "{after_forward:?}"
        );
        let grads = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            pressure.yielded() > after_forward,
            "the backward pass yields too"
        );
        yield_on_this_thread(None);
        drop(pending);
        let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, vec![3.0; 6]);
    }
}
