//! Errors of the core crate. Every message quotes the value that was wrong.

use thiserror::Error;

/// A configuration that cannot be used: unknown key, wrong type or bad value.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `origin` is the config file or the recipe.
    #[error("{origin} is not valid TOML: {message}")]
    Parse { origin: String, message: String },
    /// An unknown key or a value of the wrong type; `origin` names the file (and line) or
    /// the command-line setting that brought it.
    #[error("{origin}: {message}")]
    Schema { origin: String, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("bad override `{arg}`: {reason}")]
    Override { arg: String, reason: String },
    #[error("config key `{key}` has a bad value {value}: {reason}")]
    BadValue { key: String, value: String, reason: String },
}

/// A split, LAM chain or placement that does not fit the architecture or the devices.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("unknown architecture `{0}` (known: resnet8/14/20/32/44/56/110 and any resnet(6n+2), resnet18/34/50/101/152; vit-tiny/small/base with an optional -p<patch>, vit-w<width>-d<depth>-h<heads>-p<patch>; vgg11/13/16 with optional -cifar and -w<width>)")]
    UnknownArch(String),
    #[error("{arch} cannot take these images: {reason}")]
    InvalidInput { arch: String, reason: String },
    #[error("invalid split for {arch}: {reason}")]
    InvalidSplit { arch: String, reason: String },
    #[error("invalid LAM chain for module {module}: {reason}")]
    InvalidLam { module: usize, reason: String },
    #[error("invalid placement: {0}")]
    Placement(String),
    #[error("invalid device list `{spec}`: {reason}")]
    Device { spec: String, reason: String },
}
