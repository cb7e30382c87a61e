//! The IPVS connection on a thread of its own. A dump of a large table or
//! a batch of writes can block for seconds (a busy kernel, a lost reply
//! waits out its timeout), and the async runtime's thread, which probes,
//! runs the checks and answers `status`, must never wait on it. The
//! controller hands jobs over and takes their results at its next tick;
//! each result wakes it. Jobs run one at a time, in the order given, so a
//! dump asked after a write sees that write.

use std::sync::{mpsc, Arc};

use prober_ipvs::{
    ChangeOutcome, IpvsClient, IpvsError, VirtualService, WeightChange, WeightUpdate,
};
use tokio::sync::Notify;
use tracing::warn;

enum Job {
    Dump,
    Write(Vec<WeightChange>),
    /// Weights handed back as configured (no read-modify-write: the
    /// destination is no longer prober's).
    Restore(Vec<WeightUpdate>),
}

/// What a job came to.
pub(super) enum Done {
    /// A dump, and how long IPVS took to give it.
    Dump(Result<Vec<VirtualService>, IpvsError>, std::time::Duration),
    Written(ChangeOutcome),
}

pub(super) struct IpvsWorker {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Done>,
    wake: Arc<Notify>,
    dump_in_flight: bool,
    write_in_flight: bool,
}

impl IpvsWorker {
    /// Starts the thread; it connects at its first job (and again after a
    /// dump failed), with a receive queue of `receive_queue` bytes if
    /// given.
    pub(super) fn start(receive_queue: Option<usize>) -> Self {
        let (jobs, job_queue) = mpsc::channel();
        let (results, done) = mpsc::channel();
        let wake = Arc::new(Notify::new());
        let waker = wake.clone();
        let spawned = std::thread::Builder::new()
            .name("prober-ipvs".into())
            .spawn(move || serve(&job_queue, &results, &waker, receive_queue));
        if let Err(e) = spawned {
            // Jobs then fail as sent: IPVS is said unreadable each discovery.
            warn!("starting the IPVS thread: {e}");
        }
        Self {
            jobs,
            done,
            wake,
            dump_in_flight: false,
            write_in_flight: false,
        }
    }

    /// Notified whenever a result is ready.
    pub(super) fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Asks for a dump unless one is under way; says whether it asked.
    pub(super) fn dump(&mut self) -> bool {
        if self.dump_in_flight {
            return false;
        }
        self.dump_in_flight = self.jobs.send(Job::Dump).is_ok();
        self.dump_in_flight
    }

    pub(super) fn write_in_flight(&self) -> bool {
        self.write_in_flight
    }

    /// Hands a batch over; its outcome comes back as [`Done::Written`]
    /// (at once, all not sent, if the thread is gone).
    pub(super) fn write(&mut self, batch: Vec<WeightChange>) -> Result<(), Vec<WeightChange>> {
        match self.jobs.send(Job::Write(batch)) {
            Ok(()) => {
                self.write_in_flight = true;
                Ok(())
            }
            Err(mpsc::SendError(Job::Write(batch))) => Err(batch),
            Err(_) => unreachable!("the job sent was a write"),
        }
    }

    pub(super) fn restore(&mut self, updates: Vec<WeightUpdate>) {
        let _ = self.jobs.send(Job::Restore(updates));
    }

    /// The next result, without waiting.
    pub(super) fn take(&mut self) -> Option<Done> {
        let done = self.done.try_recv().ok()?;
        match &done {
            Done::Dump(..) => self.dump_in_flight = false,
            Done::Written(_) => self.write_in_flight = false,
        }
        Some(done)
    }
}

fn serve(
    jobs: &mpsc::Receiver<Job>,
    results: &mpsc::Sender<Done>,
    wake: &Notify,
    receive_queue: Option<usize>,
) {
    let mut client: Option<IpvsClient> = None;
    // Ends when the controller is dropped.
    while let Ok(job) = jobs.recv() {
        if client.is_none() {
            match connect(receive_queue) {
                Ok(c) => client = Some(c),
                Err(e) => {
                    let done = match job {
                        Job::Dump => Done::Dump(Err(e), std::time::Duration::ZERO),
                        Job::Write(batch) => Done::Written(ChangeOutcome {
                            not_sent: (0..batch.len()).collect(),
                            unknown: Some((Vec::new(), e)),
                            ..ChangeOutcome::default()
                        }),
                        Job::Restore(_) => {
                            warn!("restoring weights: {e}");
                            continue;
                        }
                    };
                    let _ = results.send(done);
                    wake.notify_one();
                    continue;
                }
            }
        }
        let ipvs = client.as_mut().expect("connected above");
        let done = match job {
            Job::Dump => {
                let started = std::time::Instant::now();
                let dump = ipvs.dump();
                if dump.is_err() {
                    client = None; // a fresh socket for the next try
                }
                Done::Dump(dump, started.elapsed())
            }
            Job::Write(batch) => Done::Written(ipvs.change_weights(&batch)),
            Job::Restore(updates) => {
                match ipvs.set_weights(&updates) {
                    Ok(failures) => {
                        for f in failures {
                            warn!(service = %f.service, destination = %f.destination, "weight not restored: {}", f.error);
                        }
                    }
                    Err(e) => warn!("restoring weights: {e}"),
                }
                continue;
            }
        };
        if results.send(done).is_err() {
            return;
        }
        wake.notify_one();
    }
}

fn connect(receive_queue: Option<usize>) -> Result<IpvsClient, IpvsError> {
    match receive_queue {
        Some(bytes) => IpvsClient::connect_with_receive_queue(bytes),
        None => IpvsClient::connect(),
    }
}
