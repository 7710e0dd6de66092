//! Recipes: the published training setting of each dataset, so that
//! `mlaan-pipe --gpus 0,1,2,3 --dataset imagenet` trains what the paper trained on ImageNet
//! without a config file. A dataset has one recipe per method that has a published setting of
//! its own (`--dataset cifar10 --method auglocal` takes AugLocal's); any other method starts
//! from the dataset's default recipe. A recipe *is* a shipped config file (`configs/*.toml`), compiled into
//! the binary: the files stay the one place the settings are written, and `--config FILE`
//! replaces the recipe altogether.

/// A shipped config that is the default setting for some datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe {
    /// The config file, relative to the project root, as users see it in `configs/`.
    pub file: &'static str,
    /// The datasets it is the recipe for (`--dataset` names); the first is the file's own.
    pub datasets: &'static [&'static str],
    /// The method it is the recipe for; `None`: the dataset's default, for any other method.
    pub method: Option<&'static str>,
    /// The file's text, compiled in.
    pub text: &'static str,
}

impl Recipe {
    /// The file name without directory and extension, e.g. `imagenet-resnet34-mlaan`.
    pub fn name(&self) -> &'static str {
        let base = self.file.rsplit('/').next().unwrap_or(self.file);
        base.strip_suffix(".toml").unwrap_or(base)
    }
}

impl std::fmt::Display for Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "recipe {} ({})", self.name(), self.file)
    }
}

macro_rules! recipe {
    ($file:literal, $datasets:expr) => {
        recipe!($file, $datasets, None)
    };
    ($file:literal, $datasets:expr, $method:expr) => {
        Recipe {
            file: concat!("configs/", $file),
            datasets: $datasets,
            method: $method,
            text: include_str!(concat!("../../../configs/", $file)),
        }
    };
}

/// Every recipe. Datasets without one (`synthetic`) start from the built-in defaults.
pub const RECIPES: &[Recipe] = &[
    // `make run`'s setting: MLAAN on a ResNet-8 over two CPU stages, a few minutes on a laptop.
    recipe!("default.toml", &["fashion-mnist", "mnist"]),
    // CIFAR-100 has the CIFAR-10 images' size and the same published schedule.
    recipe!("cifar10-resnet32-mlaan-dgl.toml", &["cifar10", "cifar100"]),
    recipe!("svhn-resnet32-mlaan-dgl.toml", &["svhn"]),
    recipe!("stl10-resnet32-mlaan-dgl.toml", &["stl10"]),
    // An ImageNet-style folder of photographs gets the ImageNet setting.
    recipe!("imagenet-resnet34-mlaan.toml", &["imagenet", "imagefolder"]),
    // AugLocal's official runs (its README's ResNet-32, its ImageNet run.sh).
    recipe!("cifar10-resnet32-auglocal.toml", &["cifar10", "cifar100"], Some("auglocal")),
    recipe!("imagenet-resnet34-auglocal.toml", &["imagenet", "imagefolder"], Some("auglocal")),
];

/// The recipe of `dataset` for `method` (its own, else the dataset's default), if any.
pub fn for_dataset(dataset: &str, method: Option<&str>) -> Option<&'static Recipe> {
    let of =
        |m: Option<&str>| RECIPES.iter().find(|r| r.datasets.contains(&dataset) && r.method == m);
    method.and_then(|m| of(Some(m))).or_else(|| of(None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;

    #[test]
    fn every_recipe_loads_and_names_its_own_dataset_first() {
        for r in RECIPES {
            let cfg = RunConfig::from_recipe(r, &[]).unwrap_or_else(|e| panic!("{r}: {e}"));
            assert_eq!(cfg.data.dataset, r.datasets[0], "{r}");
            assert_eq!(cfg.method.name.name(), r.method.unwrap_or(cfg.method.name.name()), "{r}");
            assert_eq!(for_dataset(r.datasets[0], r.method), Some(r));
        }
    }

    #[test]
    fn each_dataset_has_at_most_one_recipe() {
        let mut seen = std::collections::HashSet::new();
        for r in RECIPES {
            for d in r.datasets {
                assert!(seen.insert((*d, r.method)), "{d} has two recipes for {:?}", r.method);
            }
        }
        assert!(for_dataset("synthetic", None).is_none());
        assert_eq!(for_dataset("imagenet", None).unwrap().name(), "imagenet-resnet34-mlaan");
        let name = |d, m| for_dataset(d, Some(m)).unwrap().name();
        assert_eq!(name("imagenet", "auglocal"), "imagenet-resnet34-auglocal");
        assert_eq!(name("cifar100", "auglocal"), "cifar10-resnet32-auglocal");
        assert_eq!(name("imagenet", "mlaan-infopro"), "imagenet-resnet34-mlaan", "the default");
    }
}
