//! Metric sinks: `metrics.jsonl` (one record per line), the progress bar, and [`MetricsLog`],
//! which joins the stages' windows into records for every sink; TensorBoard event files are
//! `mlaan_report::EventWriter`.

use crate::evaluate::EvalResult;
use crate::skips::SkipGuard;
use anyhow::Result;
use mlaan_core::config::RunConfig;
use mlaan_core::metrics::{MetricRecord, StageWindow};
use mlaan_core::plan::NetworkPlan;
use mlaan_engine::wire::Event;
use mlaan_report::EventWriter;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::path::PathBuf;
use std::time::Instant;

/// Appends one JSON record per line and flushes each, so a crash loses nothing written.
pub struct JsonlWriter {
    out: BufWriter<File>,
}

impl JsonlWriter {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(JsonlWriter { out: BufWriter::new(File::create(path)?) })
    }

    pub fn append(path: &Path) -> std::io::Result<Self> {
        Ok(JsonlWriter {
            out: BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        })
    }

    pub fn write(&mut self, record: &MetricRecord) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

/// The bar being drawn, so that log lines can be printed above it instead of through it.
static ACTIVE_BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// A progress bar with ETA on a terminal; hidden otherwise (a log file gets no bar and no
/// escape codes). Rate and losses go into its message ([`bar_message`]), because the step
/// rate indicatif would show means less than images/s.
pub fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {pos}/{len} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    if !bar.is_hidden() {
        *ACTIVE_BAR.lock() = Some(bar.clone());
    }
    bar
}

/// The bar's message for one training window: images/s, the busiest stage's busy share of
/// its wall time (a pipeline is as fast as that stage), loss and learning rate.
pub fn bar_message(images_per_s: f64, stages: &[StageWindow], loss: f64, lr: f64) -> String {
    let busiest = stages.iter().max_by(|a, b| a.busy_fraction().total_cmp(&b.busy_fraction()));
    let busy = match busiest {
        Some(w) if stages.len() > 1 => {
            format!(" · stage {} busy {:.0}%", w.stage, 100.0 * w.busy_fraction())
        }
        _ => String::new(),
    };
    format!("{images_per_s:.0} img/s{busy} · loss {loss:.3} · lr {lr:.4}")
}

/// Runs `print` with the progress bar (if one is drawn) taken off the screen, and draws it
/// again afterwards: how log lines get above the bar.
pub fn above_bar<R>(print: impl FnOnce() -> R) -> R {
    let bar = ACTIVE_BAR.lock().clone();
    match bar {
        Some(b) if !b.is_finished() => b.suspend(print),
        _ => print(),
    }
}

/// A stage's window, its learning rate and its modules' term losses.
type StageReport = (StageWindow, f64, Vec<(usize, Vec<f64>)>);

/// Collects per-stage metric windows into records and writes them to every sink:
/// `metrics.jsonl`, the TensorBoard event file (`train.tensorboard`), the progress bar, and
/// `curves.png` at every evaluation.
pub struct MetricsLog {
    dir: PathBuf,
    /// The files written; `None` on a replica other than rank 0, which only keeps the windows.
    sinks: Option<Sinks>,
    /// Names of each module's loss terms, in the order its stage reports them.
    term_names: Vec<Vec<String>>,
    stages: usize,
    pending: BTreeMap<u64, Vec<Option<StageReport>>>,
    last: Vec<Option<StageWindow>>,
    start: Instant,
    /// Batches dropped for non-finite losses; too many in a row stop the run.
    pub skips: SkipGuard,
}

struct Sinks {
    jsonl: JsonlWriter,
    events: Option<EventWriter>,
}

impl MetricsLog {
    /// `resume_step`: continue the file, dropping records past the checkpoint that the
    /// resumed run will write again. A resumed run starts a new event file, which TensorBoard
    /// reads together with the earlier ones.
    pub fn new(
        out: &Path,
        cfg: &RunConfig,
        plan: &NetworkPlan,
        stages: usize,
        resume_step: Option<u64>,
        write: bool,
    ) -> Result<Self> {
        let mut log = MetricsLog {
            dir: out.to_path_buf(),
            sinks: None,
            term_names: plan
                .modules
                .iter()
                .map(|m| m.terms.iter().map(|t| t.kind.name().to_string()).collect())
                .collect(),
            stages,
            pending: BTreeMap::new(),
            last: vec![None; stages],
            start: Instant::now(),
            skips: SkipGuard::new(cfg.pipeline.max_consecutive_skips),
        };
        if write {
            log.sinks = Some(Sinks::open(out, cfg, resume_step)?);
        }
        Ok(log)
    }

    pub fn absorb(
        &mut self,
        events: Vec<Event>,
        epoch: usize,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        for ev in events {
            let (stage, window, step, lr, term_losses) = match ev {
                Event::Window { stage, window, step, lr, term_losses } => {
                    (stage, window, step, lr, term_losses)
                }
                Event::Skipped { stage, batch, cause } => {
                    self.skips.note(stage, batch, cause)?;
                    continue;
                }
                _ => continue,
            };
            self.last[stage] = Some(window.clone());
            let slot = self.pending.entry(step).or_insert_with(|| vec![None; self.stages]);
            slot[stage] = Some((window, lr, term_losses));
            if slot.iter().all(|s| s.is_some()) {
                let slot = self.pending.remove(&step).expect("present");
                let mut stages = Vec::with_capacity(self.stages);
                let mut loss = f64::NAN;
                let mut lr_out = 0.0;
                for (mut w, lr, terms) in slot.into_iter().flatten() {
                    // The network's loss is the last module's last term (its classifier).
                    if let Some((_, l)) = terms.last() {
                        if let Some(v) = l.last() {
                            loss = *v;
                        }
                    }
                    w.loss = terms.iter().flat_map(|(_, l)| l.iter().copied()).collect();
                    lr_out = lr;
                    stages.push(w);
                }
                let ips = stages.last().map_or(0.0, |w| w.images_per_s);
                bar.set_message(bar_message(ips, &stages, loss, lr_out));
                self.write(MetricRecord::Train {
                    step,
                    epoch,
                    loss,
                    lr: lr_out,
                    images_per_s: ips,
                    elapsed_s: self.start.elapsed().as_secs_f64(),
                    skipped_batches: self.skips.total(),
                    stages,
                })?;
            }
        }
        Ok(())
    }

    /// Log an evaluation and redraw the curves with it.
    pub fn eval(&mut self, step: u64, epoch: usize, e: &EvalResult) -> Result<()> {
        let k = e.modules.iter().map(|m| m.module + 1).max().unwrap_or(0);
        self.write(MetricRecord::Eval {
            step,
            epoch,
            test_accuracy: e.accuracy(),
            test_loss: e.loss(),
            module_accuracy: e.module_accuracy(k),
        })?;
        self.plot();
        Ok(())
    }

    fn write(&mut self, record: MetricRecord) -> Result<()> {
        let Some(sinks) = &mut self.sinks else { return Ok(()) };
        sinks.jsonl.write(&record)?;
        if let Some(events) = &mut sinks.events {
            let scalars = mlaan_report::tensorboard_scalars(&record, &self.term_names);
            events.scalars(record.step(), &scalars)?;
        }
        Ok(())
    }

    /// Redraw `curves.png`. A picture that cannot be drawn is a warning, never a failed run.
    pub fn plot(&self) {
        if self.sinks.is_none() {
            return;
        }
        if let Err(e) = mlaan_report::training_plots(&self.dir.join("metrics.jsonl"), &self.dir) {
            tracing::warn!("curves.png not drawn: {e}");
        }
    }

    pub fn last_windows(&self) -> Vec<StageWindow> {
        self.last.iter().flatten().cloned().collect()
    }
}

impl Sinks {
    /// `metrics.jsonl` (continued after `resume_step` when resuming) and the event file.
    fn open(out: &Path, cfg: &RunConfig, resume_step: Option<u64>) -> Result<Sinks> {
        let path = out.join("metrics.jsonl");
        let append = resume_step.is_some();
        if let Some(step) = resume_step {
            let kept: String = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| serde_json::from_str::<MetricRecord>(l).is_ok_and(|r| r.step() <= step))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&path, kept)?;
        }
        let events = if cfg.train.tensorboard {
            let mut w = EventWriter::create(out)?;
            w.text(resume_step.unwrap_or(0), "config", &indented(&cfg.to_toml()))?;
            Some(w)
        } else {
            None
        };
        let jsonl = if append { JsonlWriter::append(&path)? } else { JsonlWriter::create(&path)? };
        Ok(Sinks { jsonl, events })
    }
}

/// Text indented by four spaces: a Markdown code block, as TensorBoard's Text tab renders it.
fn indented(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
