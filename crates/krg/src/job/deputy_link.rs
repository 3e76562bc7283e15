//! The deputy side's link to a body that may move: it answers `Moving` with
//! `Hold` and holds back what the user sends meanwhile, reattaches to the
//! body's new node on `Moved` (or on a restart after a checkpoint), and
//! sends what it held. Whoever reads from it (the relay of an attached
//! `krg run`, or the keeper of a detached job) never sees the move.

use super::body::BodyLink;
use super::home::{Deputy, DeputyState};
use super::link;
use crate::node::Node;
use crate::wire::stream::{FromBody, ToBody};
use krg_types::NodeId;
use std::collections::VecDeque;
use std::sync::Arc;

/// Frames held while the body moves; the user's stdin is bounded by its
/// credit window, so this only limits a flood of signals.
const HELD_FRAMES_MAX: usize = 4096;

pub struct DeputyLink {
    node: Arc<Node>,
    pub deputy: Arc<Deputy>,
    link: Option<BodyLink>,
    holding: bool,
    held: VecDeque<ToBody>,
    /// A node to reattach to, kept here so an interrupted `next` resumes.
    reattach_to: Option<NodeId>,
}

impl DeputyLink {
    pub fn new(node: Arc<Node>, deputy: Arc<Deputy>, link: BodyLink) -> Self {
        DeputyLink {
            node,
            deputy,
            link: Some(link),
            holding: false,
            held: VecDeque::new(),
            reattach_to: None,
        }
    }

    /// Sends a frame to the body, or holds it while the body moves.
    pub async fn send(&mut self, frame: ToBody) {
        if !self.holding {
            if let Some(l) = &self.link {
                if l.tx.send(frame.clone()).await.is_ok() {
                    return;
                }
            }
        }
        if self.held.len() < HELD_FRAMES_MAX {
            self.held.push_back(frame);
        }
    }

    async fn flush(&mut self) {
        self.holding = false;
        while let Some(f) = self.held.pop_front() {
            let Some(l) = &self.link else {
                self.held.push_front(f);
                return;
            };
            if l.tx.send(f.clone()).await.is_err() {
                self.held.push_front(f);
                return;
            }
        }
    }

    /// The next frame for the user; moves are handled here. `None` once the
    /// job has ended (after its `Exited` or `Lost` was returned).
    pub async fn next(&mut self) -> Option<FromBody> {
        loop {
            if let Some(target) = self.reattach_to {
                let gpid = self.deputy.gpid;
                match link::reattach(&self.node, target, gpid).await {
                    Ok(l) => {
                        self.link = Some(l);
                        self.reattach_to = None;
                        *self.deputy.node.lock().unwrap_or_else(|p| p.into_inner()) = target;
                        self.deputy.set_state(DeputyState::Running);
                        self.flush().await;
                    }
                    Err(e) => {
                        tracing::warn!(gpid = %gpid, node = %target, error = %e.message, "cannot reattach to a moved job");
                        self.reattach_to = None;
                        return Some(FromBody::Lost { node: target });
                    }
                }
            }
            let Some(l) = self.link.as_mut() else {
                // Checkpointed and stopped: wait until it is restarted.
                let target = self.deputy.wait_relocation().await?;
                self.reattach_to = Some(target);
                continue;
            };
            let Some(msg) = l.rx.recv().await else {
                self.link = None;
                return Some(FromBody::Lost {
                    node: self.deputy.exec_node(),
                });
            };
            match msg {
                FromBody::Moving => {
                    self.holding = true;
                    if let Some(l) = &self.link {
                        let _ = l.tx.send(ToBody::Hold).await;
                    }
                }
                FromBody::Moved { node } => {
                    self.holding = true;
                    self.link = None;
                    self.reattach_to = Some(node);
                    // Asked where the job runs, answer the truth already.
                    *self.deputy.node.lock().unwrap_or_else(|p| p.into_inner()) = node;
                }
                FromBody::Resumed => self.flush().await,
                FromBody::Checkpointed { version } => {
                    tracing::info!(gpid = %self.deputy.gpid, version, "job checkpointed and stopped; waiting for a restart");
                    self.holding = true;
                    self.link = None;
                    self.deputy.set_state(DeputyState::Checkpointed);
                }
                other => return Some(other),
            }
        }
    }
}
