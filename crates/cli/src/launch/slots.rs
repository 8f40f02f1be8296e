//! Which device each local worker drives: worker i on GPU i of an N-GPU
//! node, or CPU slot i. The rules are plain functions of the config, the
//! worker count and the GPUs visible, so that they are tested without CUDA
//! (NCCL refuses two ranks on one GPU: a one-GPU machine cannot run two).

use anyhow::{Result, bail};

/// The GPUs this process sees, and why (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visible {
    pub count: usize,
    /// `CUDA_VISIBLE_DEVICES`, when set.
    pub restricted_to: Option<String>,
}

impl Visible {
    /// What libtorch sees here.
    pub fn here() -> Self {
        Visible {
            count: tch::Cuda::device_count().max(0) as usize,
            restricted_to: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        }
    }

    fn describe(&self) -> String {
        match &self.restricted_to {
            Some(list) => format!("{} visible (CUDA_VISIBLE_DEVICES={list:?})", self.count),
            None => format!("{} visible", self.count),
        }
    }
}

/// The `--slot` of each of `nproc` local workers for `run.device` =
/// `device` (`cpu`, `cuda`, `cuda:N`, or `auto`: CUDA when there is one).
pub fn local_slots(device: &str, nproc: u32, visible: &Visible) -> Result<Vec<String>> {
    let n = nproc as usize;
    let device = device.trim();
    let cuda = match device {
        "cpu" => false,
        "auto" => visible.count > 0,
        "cuda" => true,
        other if other.starts_with("cuda:") => true,
        other => bail!("run.device = {other:?}: expected cpu, cuda, cuda:N or auto"),
    };
    if !cuda {
        return Ok((0..n).map(|i| format!("cpu:{i}")).collect());
    }
    if n == 0 {
        // A coordinator alone (`--nproc 0`) may run where there is no GPU.
        return Ok(Vec::new());
    }
    if let Some(index) = device.strip_prefix("cuda:") {
        let Ok(index) = index.parse::<usize>() else {
            bail!("run.device = {device:?}: the GPU index is not a number");
        };
        if n > 1 {
            bail!(
                "run.device = {device:?} names one GPU, but --nproc {n} starts a worker per GPU: \
                 set run.device = \"cuda\" (worker i drives GPU i) or give --nproc 1"
            );
        }
        check_visible(index, visible)?;
        return Ok((0..n).map(|_| format!("cuda:{index}")).collect());
    }
    if n > visible.count {
        bail!(
            "--nproc {n} starts a worker per GPU, but this machine has {}: give --nproc {} \
             or fewer",
            visible.describe(),
            visible.count
        );
    }
    Ok((0..n).map(|i| format!("cuda:{i}")).collect())
}

/// `Err` unless GPU `index` is one this process sees.
pub fn check_visible(index: usize, visible: &Visible) -> Result<()> {
    if index >= visible.count {
        bail!(
            "GPU {index} is not there: {} (indices count from 0 among the visible ones)",
            visible.describe()
        );
    }
    Ok(())
}

/// The device a worker's `--slot` names, refused at once when it names no
/// GPU or one this process does not see.
pub fn device_of_slot(slot: &str, visible: &Visible) -> Result<String> {
    match slot.split_once(':') {
        Some(("cpu", n)) if n.parse::<usize>().is_ok() => Ok("cpu".into()),
        Some(("cuda", n)) => {
            let Ok(index) = n.parse::<usize>() else {
                bail!("--slot {slot}: the GPU index is not a number");
            };
            check_visible(index, visible)?;
            Ok(format!("cuda:{index}"))
        }
        None if slot == "cuda" => {
            bail!("--slot cuda names no GPU: give cuda:N (worker i of a node usually drives GPU i)")
        }
        _ => bail!("--slot {slot}: expected cpu:N or cuda:N"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(count: usize) -> Visible {
        Visible {
            count,
            restricted_to: None,
        }
    }

    #[test]
    fn worker_i_drives_gpu_i_and_cpu_slots_need_no_gpu() {
        assert_eq!(
            local_slots("cuda", 4, &gpus(8)).unwrap(),
            ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
        );
        assert_eq!(
            local_slots("auto", 2, &gpus(2)).unwrap(),
            ["cuda:0", "cuda:1"]
        );
        assert_eq!(
            local_slots("auto", 2, &gpus(0)).unwrap(),
            ["cpu:0", "cpu:1"]
        );
        assert_eq!(
            local_slots("cpu", 3, &gpus(8)).unwrap(),
            ["cpu:0", "cpu:1", "cpu:2"]
        );
    }

    #[test]
    fn a_gpu_index_in_the_config_is_kept_for_one_worker_and_refused_for_more() {
        assert_eq!(local_slots("cuda:3", 1, &gpus(8)).unwrap(), ["cuda:3"]);
        // A coordinator alone needs no GPU, whatever the workers drive.
        assert!(local_slots("cuda:3", 0, &gpus(0)).unwrap().is_empty());
        let err = local_slots("cuda:3", 2, &gpus(8)).unwrap_err().to_string();
        assert!(
            err.contains("names one GPU") && err.contains("--nproc 2"),
            "{err}"
        );
        let err = local_slots("cuda:3", 1, &gpus(2)).unwrap_err().to_string();
        assert!(err.contains("GPU 3 is not there: 2 visible"), "{err}");
    }

    #[test]
    fn more_workers_than_visible_gpus_fail_naming_both() {
        let visible = Visible {
            count: 2,
            restricted_to: Some("4,5".into()),
        };
        let err = local_slots("cuda", 4, &visible).unwrap_err().to_string();
        assert!(err.contains("--nproc 4"), "{err}");
        assert!(
            err.contains("2 visible (CUDA_VISIBLE_DEVICES=\"4,5\")"),
            "{err}"
        );
        assert!(local_slots("tpu", 1, &visible).is_err());
    }

    #[test]
    fn a_slot_names_its_device_or_is_refused_at_once() {
        assert_eq!(device_of_slot("cpu:7", &gpus(0)).unwrap(), "cpu");
        assert_eq!(device_of_slot("cuda:1", &gpus(2)).unwrap(), "cuda:1");
        let err = device_of_slot("cuda", &gpus(2)).unwrap_err().to_string();
        assert!(err.contains("names no GPU"), "{err}");
        let err = device_of_slot("cuda:2", &gpus(2)).unwrap_err().to_string();
        assert!(err.contains("GPU 2 is not there"), "{err}");
        assert!(device_of_slot("gpu:0", &gpus(2)).is_err());
        assert!(device_of_slot("cuda:x", &gpus(2)).is_err());
    }
}
