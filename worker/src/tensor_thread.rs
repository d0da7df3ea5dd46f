//! A dedicated thread that owns tch state (model, optimizer) and runs commands sent from
//! async code, so that no tensor work blocks the runtime; panics become errors.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use tokio::sync::oneshot;
use tracing::{debug, warn};

/// Why a command did not run to completion.
#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    #[error("the training thread panicked: {0}")]
    Panicked(String),
    #[error("the training thread has stopped")]
    Stopped,
}

type Command<T> = Box<dyn FnOnce(&mut T) + Send>;

/// The async side's handle to a thread owning a `T`. Dropping it stops the thread once any
/// command in flight has finished.
pub struct TensorThread<T> {
    commands: mpsc::Sender<Command<T>>,
}

impl<T> std::fmt::Debug for TensorThread<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorThread").finish_non_exhaustive()
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

impl<T: 'static> TensorThread<T> {
    /// Starts a thread named `name`, builds its state with `build` there and waits until
    /// it is built.
    pub async fn spawn<E, B>(name: &str, build: B) -> Result<TensorThread<T>, E>
    where
        B: FnOnce() -> Result<T, E> + Send + 'static,
        E: From<ThreadError> + Send + 'static,
    {
        let (commands, receiver) = mpsc::channel::<Command<T>>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), E>>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let built = std::panic::catch_unwind(AssertUnwindSafe(build)).unwrap_or_else(|p| {
                    Err(ThreadError::Panicked(panic_message(p.as_ref())).into())
                });
                match built {
                    Ok(mut state) => {
                        if ready_tx.send(Ok(())).is_ok() {
                            while let Ok(command) = receiver.recv() {
                                command(&mut state);
                            }
                            debug!("training thread stopping");
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| {
                warn!(error = %e, "cannot start the training thread");
                E::from(ThreadError::Stopped)
            })?;
        ready_rx
            .await
            .map_err(|_| E::from(ThreadError::Stopped))??;
        Ok(TensorThread { commands })
    }

    /// Runs `f` on the thread's state and returns its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, ThreadError>
    where
        F: FnOnce(&mut T) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let command: Command<T> = Box::new(move |state: &mut T| {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(state)))
                .map_err(|p| ThreadError::Panicked(panic_message(p.as_ref())));
            if reply.send(result).is_err() {
                warn!("training result dropped: the requester went away");
            }
        });
        self.commands
            .send(command)
            .map_err(|_| ThreadError::Stopped)?;
        rx.await.map_err(|_| ThreadError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_run_in_order_and_panics_become_errors() {
        let thread = TensorThread::spawn("test", || Ok::<_, ThreadError>(vec![1]))
            .await
            .unwrap();
        thread.run(|v: &mut Vec<i32>| v.push(2)).await.unwrap();
        let err = thread
            .run(|_: &mut Vec<i32>| -> i32 { panic!("boom") })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ThreadError::Panicked(m) if m == "boom"),
            "{err}"
        );
        assert_eq!(
            thread.run(|v: &mut Vec<i32>| v.clone()).await.unwrap(),
            vec![1, 2]
        );
        let failed = TensorThread::<()>::spawn("test", || Err(ThreadError::Stopped)).await;
        assert!(matches!(failed, Err(ThreadError::Stopped)));
    }
}
